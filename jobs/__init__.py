"""vlmjobs stages: prepare → sft → dpo → evaluate → merge_push.

Each stage is one Fire-driven script (``python -m jobs.<stage>``); what they share lives in
``recipe`` (the run config), ``families`` (what differs between model families), ``contract``
(how a stage reads and writes the run folder) and ``modeling`` (loading models and processors).
"""

__version__ = "0.1.0"
