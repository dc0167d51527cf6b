"""Tiny random models of the real classes, built offline, for tests and the demo.

Each is the family's real model class with its real processor class and image processor, a
byte-level BPE tokenizer trained here with ``tokenizers``, and the family's own chat template,
saved with ``save_pretrained`` so that the stages load it through the same ``from_pretrained`` path
as a hub id. Deterministic from the seed; nothing is downloaded.

    vlmjobs tiny-model --family llava --out .cache/tiny/llava
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from jobs import synthetic
from jobs.contract import UserError

# The chat templates of the checkpoints the source documents use, as their hubs ship them.
LLAVA_TEMPLATE = (  # llava-hf/llava-1.5-7b-hf
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' '}}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] + ' '}}{% endgeneration %}{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
QWEN2_VL_TEMPLATE = (  # Qwen/Qwen2-VL-7B-Instruct
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)
IDEFICS2_TEMPLATE = (  # HuggingFaceM4/idefics2-8b; the blog shows it render 'User:<image>how many families?<end_of_utterance>\n'
    "{% for message in messages %}{{message['role'].capitalize()}}{% if message['content'][0]['type'] == 'image' %}"
    "{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
SMOLVLM_TEMPLATE = (  # HuggingFaceTB/SmolVLM-Instruct: Idefics2's, opened with <|im_start|>
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}{% if message['content'][0]['type'] == "
    "'image' %}{{':'}}{% else %}{{': '}}{% endif %}{% for line in message['content'] %}{% if line['type'] == 'text' %}"
    "{{line['text']}}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
# Issue 20's families. Each as its checkpoint ships it and TRL 1.16 quotes it byte for byte (trl/chat_templates/:
# qwen2_5_vl.jinja, qwen3_vl.jinja, smolvlm.jinja; tests/test_families.py compares them).
# Qwen/Qwen2.5-VL-7B-Instruct: Qwen2-VL's template, byte for byte (the default system prompt, one
# <|vision_start|><|image_pad|><|vision_end|> per image, <|im_end|>\n after every turn)
QWEN2_5_VL_TEMPLATE = QWEN2_VL_TEMPLATE
# Qwen/Qwen3-VL-8B-Instruct: no default system prompt, tool calls, images in tool responses
QWEN3_VL_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0].role == 'system' %}\n        {%- if messages[0].content is string %}\n"
    "            {{- messages[0].content }}\n        {%- else %}\n            {%- for content in messages[0].content %}\n"
    "                {%- if 'text' in content %}\n                    {{- content.text }}\n                {%- endif %}\n"
    "            {%- endfor %}\n        {%- endif %}\n        {{- '\\n\\n' }}\n    {%- endif %}\n"
    "    {{- \"# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function "
    "signatures within <tools></tools> XML tags:\\n<tools>\" }}\n    {%- for tool in tools %}\n        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n    {%- endfor %}\n    {{- \"\\n</tools>\\n\\nFor each function call, return a json object "
    "with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": "
    "<function-name>, \\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0].role == 'system' %}\n        {{- '<|im_start|>system\\n' }}\n"
    "        {%- if messages[0].content is string %}\n            {{- messages[0].content }}\n        {%- else %}\n"
    "            {%- for content in messages[0].content %}\n                {%- if 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- endif %}\n{%- endif %}\n{%- set image_count = namespace(value=0) %}\n"
    "{%- set video_count = namespace(value=0) %}\n{%- for message in messages %}\n    {%- if message.role == \"user\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' }}\n        {%- if message.content is string %}\n"
    "            {{- message.content }}\n        {%- else %}\n            {%- for content_item in message.content %}\n"
    "                {%- if 'text' in content_item %}\n                    {{- content_item.text }}\n"
    "                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n        {%- if message.tool_calls %}\n"
    "            {%- for tool_call in message.tool_calls %}\n"
    "                {%- if (loop.first and message.content) or (not loop.first) %}\n                    {{- '\\n' }}\n"
    "                {%- endif %}\n                {%- if tool_call.function %}\n"
    "                    {%- set tool_call = tool_call.function %}\n                {%- endif %}\n"
    "                {{- '<tool_call>\\n{\"name\": \"' }}\n                {{- tool_call.name }}\n"
    "                {{- '\", \"arguments\": ' }}\n                {%- if tool_call.arguments is string %}\n"
    "                    {{- tool_call.arguments }}\n                {%- else %}\n"
    "                    {{- tool_call.arguments | tojson }}\n                {%- endif %}\n"
    "                {{- '}\\n</tool_call>' }}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '<|im_end|>\\n' }}\n    {%- elif message.role == \"tool\" %}\n"
    "        {%- if loop.first or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n        {{- '\\n<tool_response>\\n' }}\n"
    "        {%- if message.content is string %}\n            {{- message.content }}\n        {%- else %}\n"
    "            {%- for content in message.content %}\n"
    "                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}\n"
    "                    {%- set image_count.value = image_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|image_pad|><|vision_end|>\n"
    "                {%- elif content.type == 'video' or 'video' in content %}\n"
    "                    {%- set video_count.value = video_count.value + 1 %}\n"
    "                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}\n"
    "                    <|vision_start|><|video_pad|><|vision_end|>\n                {%- elif 'text' in content %}\n"
    "                    {{- content.text }}\n                {%- endif %}\n            {%- endfor %}\n        {%- endif %}\n"
    "        {{- '\\n</tool_response>' }}\n        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)
# HuggingFaceTB/SmolVLM2-2.2B-Instruct: SmolVLM's template, byte for byte. It renders no video; SmolVLMProcessor's
# apply_chat_template swaps in transformers' own template with a <video> branch for a conversation that holds one.
SMOLVLM2_TEMPLATE = SMOLVLM_TEMPLATE
# google/gemma-3-12b-it's chat_template.json (the same text its tokenizer_config.json carries and llama.cpp's GGUF of it
# reports: huggingface.co/api/models/ggml-org/gemma-3-12b-it-GGUF, "chat_template"). It writes BOS itself, folds a
# system message into the first user turn, names the assistant "model" and closes every turn with <end_of_turn>\n.
GEMMA3_TEMPLATE = (
    "{{ bos_token }}\n{%- if messages[0]['role'] == 'system' -%}\n    {%- if messages[0]['content'] is string -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}\n    {%- else -%}\n"
    "        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}\n    {%- endif -%}\n"
    "    {%- set loop_messages = messages[1:] -%}\n{%- else -%}\n    {%- set first_user_prefix = \"\" -%}\n"
    "    {%- set loop_messages = messages -%}\n{%- endif -%}\n{%- for message in loop_messages -%}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}\n"
    "        {{ raise_exception(\"Conversation roles must alternate user/assistant/user/assistant/...\") }}\n"
    "    {%- endif -%}\n    {%- if (message['role'] == 'assistant') -%}\n        {%- set role = \"model\" -%}\n"
    "    {%- else -%}\n        {%- set role = message['role'] -%}\n    {%- endif -%}\n"
    "    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else \"\") }}\n"
    "    {%- if message['content'] is string -%}\n        {{ message['content'] | trim }}\n"
    "    {%- elif message['content'] is iterable -%}\n        {%- for item in message['content'] -%}\n"
    "            {%- if item['type'] == 'image' -%}\n                {{ '<start_of_image>' }}\n"
    "            {%- elif item['type'] == 'text' -%}\n                {{ item['text'] | trim }}\n            {%- endif -%}\n"
    "        {%- endfor -%}\n    {%- else -%}\n        {{ raise_exception(\"Invalid content type\") }}\n    {%- endif -%}\n"
    "    {{ '<end_of_turn>\n' }}\n{%- endfor -%}\n{%- if add_generation_prompt -%}\n    {{'<start_of_turn>model\n'}}\n"
    "{%- endif -%}\n"
)
# OpenGVLab/InternVL3-8B-hf's chat template: the one transformers' conversion script wrote into every InternVL -hf
# repository (src/transformers/models/internvl/convert_internvl_weights_to_hf.py, chat_template), no default system
# message, an image as <IMG_CONTEXT> on its own line (the processor widens it into <img>, its tiles' tokens, </img>).
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}{% endif %}"
)
# meta-llama/Llama-3.2-11B-Vision-Instruct's chat template (the repository is gated; this is its text as two public copies
# quote it alike: swift-jinja's Tests/Templates/VisionTests.swift, llama3_2visionChatTemplate, rendered there as
# "Llama3_2_11BVisionInstruct", and NVIDIA NeMo's MLlamaTemplateConfig). It writes BOS itself, a system block with the
# date only for a conversation without images, and refuses a system message beside images (jobs.families: mllama
# folds one into the first user turn); <|image|> where each image is, <|eot_id|> after every turn.
MLLAMA_TEMPLATE = (
    "{{- bos_token }}\n{%- if custom_tools is defined %}\n    {%- set tools = custom_tools %}\n{%- endif %}\n"
    "{%- if not tools_in_user_message is defined %}\n    {%- set tools_in_user_message = true %}\n{%- endif %}\n"
    "{%- if not date_string is defined %}\n    {%- if strftime_now is defined %}\n"
    "        {%- set date_string = strftime_now(\"%d %b %Y\") %}\n    {%- else %}\n"
    "        {%- set date_string = \"26 Jul 2024\" %}\n    {%- endif %}\n{%- endif %}\n"
    "{%- if not tools is defined %}\n    {%- set tools = none %}\n{%- endif %}\n\n"
    "{#- This block extracts the system message, so we can slot it into the right place. #}\n"
    "{%- if messages[0]['role'] == 'system' %}\n    {%- set system_message = messages[0]['content']|trim %}\n"
    "    {%- set messages = messages[1:] %}\n{%- else %}\n    {%- set system_message = \"\" %}\n{%- endif %}\n\n"
    "{#- Find out if there are any images #}\n{% set image_ns = namespace(has_images=false) %}      \n"
    "{%- for message in messages %}\n    {%- for content in message['content'] %}\n"
    "        {%- if content['type'] == 'image' %}\n            {%- set image_ns.has_images = true %}\n"
    "        {%- endif %}\n    {%- endfor %}\n{%- endfor %}\n\n"
    "{#- Error out if there are images and system message #}\n"
    "{%- if image_ns.has_images and not system_message == \"\" %}\n"
    "    {{- raise_exception(\"Prompting with images is incompatible with system messages.\") }}\n{%- endif %}\n\n"
    "{#- System message if there are no images #}\n{%- if not image_ns.has_images %}\n"
    "    {{- \"<|start_header_id|>system<|end_header_id|>\\n\\n\" }}\n    {%- if tools is not none %}\n"
    "        {{- \"Environment: ipython\\n\" }}\n    {%- endif %}\n"
    "    {{- \"Cutting Knowledge Date: December 2023\\n\" }}\n    {{- \"Today Date: \" + date_string + \"\\n\\n\" }}\n"
    "    {%- if tools is not none and not tools_in_user_message %}\n"
    "        {{- \"You have access to the following functions. To call a function, please respond with JSON for a function call.\" }}\n"
    "        {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "        {{- \"Do not use variables.\\n\\n\" }}\n        {%- for t in tools %}\n"
    "            {{- t | tojson(indent=4) }}\n            {{- \"\\n\\n\" }}\n        {%- endfor %}\n"
    "    {%- endif %}\n    {{- system_message }}\n    {{- \"<|eot_id|>\" }}\n{%- endif %}\n\n"
    "{#- Custom tools are passed in a user message with some extra guidance #}\n"
    "{%- if tools_in_user_message and not tools is none %}\n"
    "    {#- Extract the first user message so we can plug it in here #}\n    {%- if messages | length != 0 %}\n"
    "        {%- set first_user_message = messages[0]['content']|trim %}\n"
    "        {%- set messages = messages[1:] %}\n    {%- else %}\n"
    "        {{- raise_exception(\"Cannot put tools in the first user message when there's no first user message!\") }}\n"
    "{%- endif %}\n    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' -}}\n"
    "    {{- \"Given the following functions, please respond with a JSON for a function call \" }}\n"
    "    {{- \"with its proper arguments that best answers the given prompt.\\n\\n\" }}\n"
    "    {{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.' }}\n"
    "    {{- \"Do not use variables.\\n\\n\" }}\n    {%- for t in tools %}\n        {{- t | tojson(indent=4) }}\n"
    "        {{- \"\\n\\n\" }}\n    {%- endfor %}\n    {{- first_user_message + \"<|eot_id|>\"}}\n{%- endif %}\n\n"
    "{%- for message in messages %}\n"
    "    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}\n"
    "    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}\n"
    "        {%- if message['content'] is string %}\n            {{- message['content'] }}\n        {%- else %}\n"
    "            {%- for content in message['content'] %}\n                {%- if content['type'] == 'image' %}\n"
    "                    {{- '<|image|>' }}\n                {%- elif content['type'] == 'text' %}\n"
    "                    {{- content['text'] }}\n                {%- endif %}\n            {%- endfor %}\n"
    "        {%- endif %}\n        {{- '<|eot_id|>' }}\n    {%- elif 'tool_calls' in message %}\n"
    "        {%- if not message.tool_calls|length == 1 %}\n"
    "            {{- raise_exception(\"This model only supports single tool-calls at once!\") }}\n"
    "        {%- endif %}\n        {%- set tool_call = message.tool_calls[0].function %}\n"
    "        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}\n"
    "        {{- '{\"name\": \"' + tool_call.name + '\", ' }}\n        {{- '\"parameters\": ' }}\n"
    "        {{- tool_call.arguments | tojson }}\n        {{- \"}\" }}\n        {{- \"<|eot_id|>\" }}\n"
    "    {%- elif message.role == \"tool\" or message.role == \"ipython\" %}\n"
    "        {{- \"<|start_header_id|>ipython<|end_header_id|>\\n\\n\" }}\n"
    "        {%- if message.content is mapping or message.content is iterable %}\n"
    "            {{- message.content | tojson }}\n        {%- else %}\n            {{- message.content }}\n"
    "        {%- endif %}\n        {{- \"<|eot_id|>\" }}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n"
)
# google/paligemma-3b-pt-224 ships no chat template (a pretrained prefix-LM, not a chat model); the template the
# stages give it is jobs.families.PALIGEMMA_TEMPLATE, applied when the processor is loaded.

VOCAB_SIZE = 600
IMAGE_SIZE = 32  # pixels; small enough to train in seconds on a CPU, large enough to see a bar
# Every linear layer takes a multiple of 64 features and gives a multiple of 32: bitsandbytes' 4-bit inference
# kernel for CPUs with AVX512-BF16 packs weights in blocks of that size, so evaluating a QLoRA run on such a CPU
# fails on anything narrower (``check_4bit_shapes``). Real checkpoints' widths are all multiples of 64.
VISION_WIDTH = 64


def build(family: str, out: str | Path, seed: int = 0, image_tokens: int | None = None) -> Path:
    """Build and save the tiny model of ``family`` into ``out``; returns ``out``. ``image_tokens``: Idefics2's
    tokens per image, its resampler's latents (4 by default, for fast tests; 64 in idefics2-8b, for a benchmark
    whose prompts must weigh what real ones do)."""
    import torch

    if family not in BUILDERS:
        raise UserError(f"--family: no tiny model for {family!r} (have: {', '.join(BUILDERS)})")
    if image_tokens is not None and family != "idefics2":
        raise UserError(f"--image-tokens: only the tiny idefics2 takes it; {family}'s follow from its image size")
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](**({} if image_tokens is None else {"latents": image_tokens}))
    check_4bit_shapes(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


# What a tiny model is drawn from besides this module and jobs.synthetic (its tokenizer's corpus): the libraries that
# initialise its weights (torch's generator, transformers' _init_weights), train its tokenizer and save both.
BUILT_WITH = ("torch", "transformers", "tokenizers", "safetensors", "huggingface_hub")
MANIFEST = "built.json"  # written last into a cached model: each file's sha256, checked before the folder is reused


def build_key() -> str:
    """A digest of everything a tiny model is built from: this module's and jobs.synthetic's source and the versions of
    BUILT_WITH. A changed template, builder or library gives another key, so a cache never serves an older model."""
    import hashlib
    import sys
    from importlib.metadata import version

    digest = hashlib.sha256(sys.version.encode())
    for source in (__file__, synthetic.__file__):
        digest.update(Path(source).read_bytes())
    for library in BUILT_WITH:
        digest.update(f"{library}=={version(library)}".encode())
    return digest.hexdigest()[:16]


def cached(family: str, root: str | Path) -> Path:
    """The tiny model of ``family`` in ``root``/<build_key>/<family>, built there once and reused by later processes
    (the tests' sessions, each of make mutate's variants). Built into a private folder beside it and renamed into
    place, so that two processes racing both end with a whole model; a folder whose files no longer match its
    manifest (something wrote into it) is replaced, never served."""
    import json
    import shutil
    import tempfile

    folder = Path(root) / build_key() / family
    if _intact(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=folder.parent))
    try:
        build(family, staging)
        (staging / MANIFEST).write_text(json.dumps(_digests(staging), indent=1, sort_keys=True))
        if folder.exists() and not _intact(folder):  # changed since it was built: moved aside and deleted, not reused
            aside = Path(tempfile.mkdtemp(prefix=f".{family}-changed-", dir=folder.parent))
            try:
                folder.rename(aside / family)
            except FileNotFoundError:  # another process moved it first
                pass
            shutil.rmtree(aside, ignore_errors=True)
        try:
            staging.rename(folder)
        except OSError:  # another process renamed its build in first: the same model, from the same key
            if not _intact(folder):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _digests(folder: Path) -> dict[str, str]:
    import hashlib

    return {str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(folder.rglob("*")) if path.is_file() and path.name != MANIFEST}


def _intact(folder: Path) -> bool:
    import json

    try:
        return json.loads((folder / MANIFEST).read_text()) == _digests(folder)
    except (OSError, ValueError):
        return False


def train_tokenizer(
    special: list[str], bos: str | None, eos: str, pad: str, unk: str | None = None, add_bos_token: bool = True, **extra
):
    """A byte-level BPE tokenizer trained on the synthetic data's text, wrapped as a transformers tokenizer.

    ``add_bos_token`` as the real checkpoint's tokenizer sets it: true for Llama, Mistral and Gemma tokenizers, which
    put ``bos`` in front of a text encoded with add_special_tokens through their post-processor ("<s> $A", "<s> $A <s>
    $B", saved in tokenizer.json, which is what transformers 5 reads back); false where the tokenizer only names it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(synthetic.corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
        add_bos_token=bool(bos and add_bos_token), add_eos_token=False, **extra
    )


def _llava():
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer = train_tokenizer(["<unk>", "<s>", "</s>", "<pad>", "<image>"], bos="<s>", eos="</s>", pad="<pad>", unk="<unk>")
    patch = 8
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
        chat_template=LLAVA_TEMPLATE,
    )
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=patch, projection_dim=VISION_WIDTH,
        ),
        text_config=LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    # 0.07, not the usual 0.1: whether the demo's full DPO (lr 1e-3, beta 0.5) keeps answering yes/no or collapses
    # to digits swings with the init (0 to 1.0 yes/no accuracy over 0.02-0.15); at 0.07 it answers, SFT still learns
    _widen_vision_init(model, ("model.vision_tower", "model.multi_modal_projector"), std=0.07)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def _qwen2_vl():
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(special, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        min_pixels=(patch * merge) ** 2, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    )
    video_processor = Qwen2VLVideoProcessor(patch_size=patch, merge_size=merge, temporal_patch_size=2)
    processor = Qwen2VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN2_VL_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2VLConfig(
        vision_config=dict(
            depth=2, embed_dim=VISION_WIDTH, hidden_size=64, num_heads=2, mlp_ratio=2,
            patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def _idefics2(latents: int = 4):
    from transformers import (
        Idefics2Config,
        Idefics2ForConditionalGeneration,
        Idefics2ImageProcessor,
        Idefics2Processor,
    )

    # Mistral-style tokenizer (<s> prepended) with the three tokens Idefics2Processor adds itself.
    special = ["<unk>", "<s>", "</s>", "<fake_token_around_image>", "<image>", "<end_of_utterance>"]
    tokenizer = train_tokenizer(special, bos="<s>", eos="</s>", pad="<unk>", unk="<unk>")
    # latents: the perceiver resampler's output, the <image> tokens per image (64 in idefics2-8b)
    # idefics2-8b saves do_image_splitting=True; the blog turns it off when loading (jobs.families).
    image_processor = Idefics2ImageProcessor(
        size={"longest_edge": IMAGE_SIZE, "shortest_edge": IMAGE_SIZE // 2}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics2Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=latents, chat_template=IDEFICS2_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Idefics2Config(
        vision_config=dict(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=8,
        ),
        perceiver_config=dict(
            hidden_size=64, resampler_n_latents=latents, resampler_depth=1, resampler_n_heads=2,
            resampler_head_dim=32, num_key_value_heads=1,
        ),
        text_config=dict(
            model_type="mistral", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
            bos_token_id=ids("<s>"), eos_token_id=ids("</s>"), pad_token_id=ids("<unk>"),
        ),
        image_token_id=ids("<image>"),
    )
    model = Idefics2ForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_model", "model.connector"))
    model.generation_config.pad_token_id = ids("<unk>")
    return model, processor


def _idefics3():
    """SmolVLM-Instruct's layout: Idefics3 classes, a SigLIP tile encoder, pixel shuffle, image splitting on."""
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
               "<end_of_utterance>", "<global-img>", *tiles]
    # SmolLM2's tokenizer names <|im_start|> bos and <|im_end|> eos but prepends nothing; turns end with <end_of_utterance>.
    tokenizer = train_tokenizer(special, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", add_bos_token=False)
    patch, scale = 8, 2
    image_seq_len = (IMAGE_SIZE // patch) ** 2 // scale**2  # tokens per tile after pixel shuffle (81 in SmolVLM)
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 4 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=image_seq_len, chat_template=SMOLVLM_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=patch,
        ),
        text_config=dict(
            model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
            bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids("<|im_end|>"),
        ),
        scale_factor=scale,
        image_token_id=ids("<image>"),
    )
    model = Idefics3ForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_model", "model.connector"))
    model.generation_config.eos_token_id = ids("<end_of_utterance>")  # as SmolVLM-Instruct's generation config
    model.generation_config.pad_token_id = ids("<|im_end|>")
    return model, processor


def _paligemma():
    """paligemma-3b-pt-224's layout: SigLIP at a fixed size, Gemma, no chat template (a pretrained prefix-LM)."""
    from transformers import (
        PaliGemmaConfig,
        PaliGemmaForConditionalGeneration,
        PaliGemmaProcessor,
        SiglipImageProcessor,
    )

    tokenizer = train_tokenizer(["<pad>", "<eos>", "<bos>", "<unk>", "<image>"], bos="<bos>", eos="<eos>", pad="<pad>",
                                unk="<unk>")
    patch = 8
    image_seq_length = (IMAGE_SIZE // patch) ** 2  # one token per SigLIP patch (256 at 224 px)
    image_processor = SiglipImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        image_seq_length=image_seq_length,
    )
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tokenizer)  # adds <loc>/<seg> tokens
    ids = tokenizer.convert_tokens_to_ids
    hidden = 64
    config = PaliGemmaConfig(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2,
            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=patch, vision_use_head=False,
        ),
        text_config=dict(
            model_type="gemma", hidden_size=hidden, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=512,
            bos_token_id=ids("<bos>"), eos_token_id=ids("<eos>"), pad_token_id=ids("<pad>"),
        ),
        image_token_index=ids("<image>"), vocab_size=len(tokenizer), projection_dim=hidden, hidden_size=hidden,
    )
    model = PaliGemmaForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_tower", "model.multi_modal_projector"))
    model.generation_config.pad_token_id = ids("<pad>")
    return model, processor


def _qwen2_5_vl():
    """Qwen2.5-VL-7B-Instruct's layout: Qwen2-VL's processor and tokenizer, a vision tower with window attention
    (window_size pixels a side, blocks in fullatt_block_indexes attending over the whole image), RMSNorm, SwiGLU."""
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLImageProcessor,
        Qwen2VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(special, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        min_pixels=(patch * merge) ** 2, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    )
    # frames within the images' pixel bounds: the default video budget (100k to 600k pixels a frame) would make a
    # test's 40 x 56 frames thousands of tokens
    video_processor = Qwen2VLVideoProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        min_pixels=(patch * merge) ** 2, max_pixels=IMAGE_SIZE * IMAGE_SIZE * 4,
    )
    processor = Qwen2_5_VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN2_5_VL_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        vision_config=dict(
            depth=2, hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_heads=2, out_hidden_size=64,
            patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
            # 16 px windows: a 32 px image is 2 x 2 windows, so block 0 attends within each and block 1 over all
            # (the 7B: 112 px windows, full attention in blocks 7, 15, 23, 31 of 32)
            window_size=2 * patch * merge, fullatt_block_indexes=[1],
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer), max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]  # as the 7B's generation config
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def _qwen3_vl():
    """Qwen3-VL-8B-Instruct's layout: learned vision position embeddings, DeepStack (features of chosen vision blocks
    added to the first text layers' hidden states), interleaved multimodal rotary positions, a Qwen3 text model with
    q/k norms; Qwen2-VL's image processor with 16 px patches, and Qwen3-VL's video processor (timestamps per frame)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = train_tokenizer(special, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        min_pixels=(patch * merge) ** 2, max_pixels=IMAGE_SIZE * IMAGE_SIZE,
    )
    # its pixel budget is over all of a video's frames (its smart_resize takes the frame count): the default's 786k
    # pixels would make a test's 40 x 56 frames thousands of tokens; this keeps sixteen 64 x 64 frames
    video_processor = Qwen3VLVideoProcessor(
        patch_size=patch, merge_size=merge, temporal_patch_size=2,
        size={"shortest_edge": (patch * merge) ** 2, "longest_edge": 16 * 64 * 64},
    )
    processor = Qwen3VLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, chat_template=QWEN3_VL_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen3VLConfig(
        vision_config=dict(
            depth=2, hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_heads=2, out_hidden_size=64,
            patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2,
            num_position_embeddings=(IMAGE_SIZE // patch) ** 2,  # a grid of 8 x 8 learned positions (48 x 48 in the 8B)
            deepstack_visual_indexes=[0],  # the 8B: blocks 8, 16, 24 of 27
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=len(tokenizer), max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3], "mrope_interleaved": True},
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<|image_pad|>"), video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"), vision_end_token_id=ids("<|vision_end|>"),
    )
    model = Qwen3VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = [ids("<|im_end|>"), ids("<|endoftext|>")]
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def _smolvlm2():
    """SmolVLM2-2.2B-Instruct's layout: SmolVLM classes (Idefics3's SigLIP tiles, pixel shuffle, image splitting), a
    SmolLM2 tokenizer, and a video processor that samples frames and writes each as a tile with its timestamp."""
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )

    tiles = [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<fake_token_around_image>", "<image>",
               "<end_of_utterance>", "<global-img>", *tiles]
    # As SmolVLM's SmolLM2 tokenizer (the Idefics3 twin's): <|im_start|> named BOS but never prepended, which the
    # template writes itself; turns end with <end_of_utterance>. Taken from SmolVLM (v1), not read off SmolVLM2's files.
    tokenizer = train_tokenizer(special, bos="<|im_start|>", eos="<|im_end|>", pad="<|im_end|>", add_bos_token=False)
    patch, scale = 8, 2
    image_seq_len = (IMAGE_SIZE // patch) ** 2 // scale**2  # tokens per tile after pixel shuffle (81 in SmolVLM2-2.2B)
    tile = {"longest_edge": IMAGE_SIZE}
    image_processor = SmolVLMImageProcessor(
        size={"longest_edge": 4 * IMAGE_SIZE}, max_image_size=tile, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    # Sampling as the checkpoints' preprocessor_config.json sets it (HuggingFaceTB/SmolVLM2-256M-Video-Instruct's:
    # "video_sampling": {"fps": 1, "max_frames": 64, ...}): at most 64 frames, one a second. Loaded, the video processor
    # takes the image processor's size as its video_size (SmolVLMVideoProcessor.__init__), so a frame's longest side goes
    # to size["longest_edge"] before it is squashed to one max_image_size tile, as here.
    video_processor = SmolVLMVideoProcessor(
        size={"longest_edge": 4 * IMAGE_SIZE}, max_image_size=tile, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        video_sampling={"fps": 1, "max_frames": 64, "video_size": {"longest_edge": 4 * IMAGE_SIZE}},
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor, image_seq_len=image_seq_len,
        chat_template=SMOLVLM2_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = SmolVLMConfig(
        vision_config=dict(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=IMAGE_SIZE, patch_size=patch,
        ),
        text_config=dict(
            model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=1024,
            bos_token_id=ids("<|im_start|>"), eos_token_id=ids("<end_of_utterance>"), pad_token_id=ids("<|im_end|>"),
        ),
        scale_factor=scale,
        image_token_id=ids("<image>"),
    )
    model = SmolVLMForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_model", "model.connector"))
    model.generation_config.eos_token_id = ids("<end_of_utterance>")
    model.generation_config.pad_token_id = ids("<|im_end|>")
    return model, processor

def _gemma3():
    """gemma-3-12b-it's layout: SigLIP at a fixed size, its patches average-pooled to mm_tokens_per_image soft tokens,
    a Gemma 3 decoder whose sliding-window layers alternate with global ones (5:1 in the real model), images attended
    both ways among their own tokens (token_type_ids 1)."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessor, Gemma3Processor

    # Gemma's tokenizer puts <bos> in front (add_bos_token), as does the template: the card tokenizes inside
    # apply_chat_template, which then adds none. The three image tokens are named as the real tokenizer_config.json
    # names them (Gemma3Processor reads tokenizer.boi_token, eoi_token and image_token).
    image_tokens = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    special = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", *image_tokens.values()]
    tokenizer = train_tokenizer(special, bos="<bos>", eos="<eos>", pad="<pad>", unk="<unk>", extra_special_tokens=image_tokens)
    patch, tokens_per_image = 8, 4  # 4 x 4 patches pooled 2 x 2 (64 x 64 pooled 4 x 4 in the real model: 256 tokens)
    image_processor = Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    processor = Gemma3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_length=tokens_per_image, chat_template=GEMMA3_TEMPLATE
    )
    ids = tokenizer.convert_tokens_to_ids
    config = Gemma3Config(
        vision_config=dict(
            model_type="siglip_vision_model", hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2,
            num_attention_heads=2, image_size=IMAGE_SIZE, patch_size=patch, vision_use_head=False,
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, query_pre_attn_scalar=16, vocab_size=len(tokenizer), max_position_embeddings=512,
            # a window shorter than a prompt with its image, so rows run past it as real ones run past 1024
            sliding_window=8, layer_types=["sliding_attention", "full_attention"],
            bos_token_id=ids("<bos>"), eos_token_id=[ids("<eos>"), ids("<end_of_turn>")], pad_token_id=ids("<pad>"),
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"), image_token_index=ids("<image_soft_token>"),
    )
    model = Gemma3ForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_tower", "model.multi_modal_projector"))
    # as gemma-3-12b-it's generation_config.json: a turn ends at <end_of_turn> (106) or <eos> (1)
    model.generation_config.eos_token_id = [ids("<eos>"), ids("<end_of_turn>")]
    model.generation_config.pad_token_id = ids("<pad>")
    model.generation_config.bos_token_id = ids("<bos>")
    return model, processor


def _internvl():
    """InternVL3-8B-hf's layout: InternViT on 448-px tiles (an image cut into up to 12 of them plus a thumbnail),
    pixel-shuffled to a quarter of its patches, an MLP projector, a Qwen2 decoder."""
    from transformers import (
        GotOcr2ImageProcessor,
        InternVLConfig,
        InternVLForConditionalGeneration,
        InternVLProcessor,
        InternVLVideoProcessor,
    )

    # Qwen2.5-VL's tokenizer, which the conversion script gives InternVL3 (convert_internvl_weights_to_hf.py,
    # write_tokenizer): no BOS, <|im_end|> ends a turn and is eos (151645), and InternVL's image tokens named as it
    # names them (InternVLProcessor reads tokenizer.start_image_token, end_image_token, context_image_token, video_token)
    image_tokens = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                    "video_token": "<video>"}
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *image_tokens.values()]
    tokenizer = train_tokenizer(special, bos=None, eos="<|im_end|>", pad="<|endoftext|>", extra_special_tokens=image_tokens)
    patch, downsample = 8, 0.5
    image_seq_length = int((IMAGE_SIZE // patch) ** 2 * downsample**2)  # per tile: 4 here, (448 / 14)^2 / 4 = 256 real
    tile = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]  # the conversion script's ImageNet statistics
    image_processor = GotOcr2ImageProcessor(size=tile, min_patches=1, max_patches=4, image_mean=mean, image_std=std)
    video_processor = InternVLVideoProcessor(size=tile, image_mean=mean, image_std=std)
    processor = InternVLProcessor(
        image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
        image_seq_length=image_seq_length, chat_template=INTERNVL_TEMPLATE,
    )
    ids = tokenizer.convert_tokens_to_ids
    config = InternVLConfig(
        vision_config=dict(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_attention_heads=2,
            image_size=[IMAGE_SIZE, IMAGE_SIZE], patch_size=[patch, patch],
        ),
        text_config=dict(
            model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512, tie_word_embeddings=False,
            bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"), pad_token_id=ids("<|endoftext|>"),
        ),
        image_token_id=ids("<IMG_CONTEXT>"), image_seq_length=image_seq_length, downsample_ratio=downsample,
        tie_word_embeddings=False,  # Qwen2.5-7B's are not tied
    )
    model = InternVLForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_tower", "model.multi_modal_projector"))
    model.generation_config.eos_token_id = ids("<|im_end|>")
    model.generation_config.pad_token_id = ids("<|endoftext|>")
    return model, processor


def _mllama():
    """Llama-3.2-11B-Vision-Instruct's layout: a tiled vision encoder (each image resized onto the canvas of up to 4 tiles
    nearest its aspect ratio, per-tile and aspect-ratio position embeddings, a local then a global encoder whose chosen
    intermediate layers are concatenated), projected into the keys and values of gated cross-attention layers set between
    a Llama 3.1 decoder's self-attention layers. The text holds one <|image|> token per image, outside the LM head's
    vocabulary (the embedding has 8 rows more); which text tokens see which image's tiles is cross_attention_mask."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaImageProcessor, MllamaProcessor

    # Llama 3's tokenizer: <|begin_of_text|> put in front by its post-processor (add_special_tokens), <|eot_id|> the
    # Instruct tokenizer's eos and the end of every turn, <|finetune_right_pad_id|> its pad (128004 in the config)
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad_id|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    tokenizer = train_tokenizer(special, bos="<|begin_of_text|>", eos="<|eot_id|>", pad="<|finetune_right_pad_id|>")
    tokenizer.add_tokens(["<|image|>"], special_tokens=True)  # the last id, as 128256 is in the real one's 128257
    ids = tokenizer.convert_tokens_to_ids
    tile, patch = IMAGE_SIZE, 8  # 560 px tiles of 14 px patches in the real model
    image_processor = MllamaImageProcessor(size={"height": tile, "width": tile}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=MLLAMA_TEMPLATE)
    config = MllamaConfig(
        vision_config=dict(
            hidden_size=VISION_WIDTH, intermediate_size=2 * VISION_WIDTH, num_hidden_layers=2, num_global_layers=1,
            attention_heads=2, image_size=tile, patch_size=patch, max_num_tiles=4,
            intermediate_layers_indices=[0],  # the 11B: [3, 7, 15, 23, 30], concatenated with the last layer's output
            vision_output_dim=2 * VISION_WIDTH,
        ),
        text_config=dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=len(tokenizer) - 1, max_position_embeddings=512,
            cross_attention_layers=[1],  # the 11B: 8 of its 40 layers, [3, 8, 13, ..., 38]
            bos_token_id=ids("<|begin_of_text|>"), eos_token_id=ids("<|eot_id|>"), pad_token_id=ids("<|finetune_right_pad_id|>"),
        ),
        image_token_index=ids("<|image|>"),
    )
    model = MllamaForConditionalGeneration(config)
    _widen_vision_init(model, ("model.vision_model", "model.multi_modal_projector"))
    # as the 11B-Instruct's generation_config.json: <|end_of_text|>, <|eom_id|>, <|eot_id|> (128001, 128008, 128009)
    model.generation_config.eos_token_id = [ids("<|end_of_text|>"), ids("<|eom_id|>"), ids("<|eot_id|>")]
    model.generation_config.pad_token_id = ids("<|finetune_right_pad_id|>")
    model.generation_config.bos_token_id = ids("<|begin_of_text|>")
    return model, processor


def check_4bit_shapes(model) -> None:
    """Fail on a linear layer that bitsandbytes' CPU inference kernel cannot pack (see VISION_WIDTH)."""
    import torch

    odd = [f"{name} ({m.in_features} -> {m.out_features})" for name, m in model.named_modules()
           if isinstance(m, torch.nn.Linear) and name != "lm_head" and (m.in_features % 64 or m.out_features % 32)]
    if odd:
        raise ValueError(f"tiny model: linear layers a 4-bit CPU forward cannot run: {', '.join(odd)}")


def _widen_vision_init(model, prefixes: tuple[str, ...], std: float = 0.1) -> None:
    """Re-draw the vision weights wider than the usual 0.02. At that scale a tiny random vision tower's
    features barely differ between images, so a few hundred training steps learn the answers' prior and
    ignore the picture; wider, the picture matters within the demo's budget (0.3 -> 0.9 held-out accuracy)."""
    import torch

    widened = [p for name, p in model.named_parameters() if name.startswith(prefixes) and p.dim() > 1]
    if not widened:  # transformers 5 moved the towers under model.: a stale prefix would widen nothing, silently
        raise ValueError(f"tiny model: no weights under {prefixes} to widen")
    for parameter in widened:
        torch.nn.init.normal_(parameter, std=std)


BUILDERS: dict[str, Callable] = {
    "llava": _llava, "qwen2_vl": _qwen2_vl, "idefics2": _idefics2, "idefics3": _idefics3, "paligemma": _paligemma,
    "qwen2_5_vl": _qwen2_5_vl, "qwen3_vl": _qwen3_vl, "smolvlm2": _smolvlm2, "gemma3": _gemma3, "internvl": _internvl,
    "mllama": _mllama,
}
