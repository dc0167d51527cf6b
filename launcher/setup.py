"""The cluster set-up in k8s/, written from the same pure functions as the Jobs (``make k8s``).

    k8s/namespace.yaml                    the namespace, enforcing the restricted Pod Security Standard
    k8s/pvc.yaml                          the shared volume of the run folders
    k8s/rbac.yaml                         the pipeline driver's ServiceAccount, Role and RoleBinding
    k8s/templates/hf-token-secret.yaml    the HF_TOKEN Secret's shape, with a placeholder value
    k8s/examples/kueue-localqueue.yaml    a Kueue LocalQueue, for clusters that queue with Kueue

    k8s/kustomization.yaml                the kustomize base: the first three, nothing else
    k8s/nightly/kustomization.yaml        the nightly schedule, apart: cronjob.yaml, written by make nightly

``make k8s-apply`` is ``kubectl apply -k k8s/``: the set-up, once per cluster; the Secret template is
never part of it, so a real Secret survives it. ``make nightly`` renders the CronJob from the recipe
and the image (``vlmjobs cronjob --out``) and applies k8s/nightly; examples/ are applied by hand.
"""

from __future__ import annotations

from pathlib import Path

from jobs.recipe import Kubernetes
from launcher import render

GENERATED = (
    "# Written by `make k8s` (launcher/setup.py) from the recipe's kubernetes section; regenerate, don't edit.\n"
)


def files(
    k: Kubernetes, *, size: str, access_mode: str, storage_class: str | None, cluster_queue: str
) -> dict[str, tuple[str, list[dict]]]:
    """{relative path: (header comment, manifests)}"""
    return {
        "namespace.yaml": (
            "# Pods here must meet the restricted Pod Security Standard; every vlmjobs pod does.\n",
            [render.render_namespace(k.namespace)],
        ),
        "pvc.yaml": (
            "# The run folders. ReadWriteOnce attaches to one node at a time, which the chain allows for (a stage\n"
            "# starts once the last one's pod has ended). Multi-node stages need ReadWriteMany (NFS, CephFS, EFS,\n"
            '# Filestore...): `make k8s K8S_ARGS="--access_mode=ReadWriteMany --storage_class=<class>"`.\n',
            [render.render_pvc(k.namespace, k.pvc, size=size, access_mode=access_mode, storage_class=storage_class)],
        ),
        "rbac.yaml": (
            "# The pipeline driver (vlmjobs pipeline --in-cluster, the nightly CronJob): least privilege.\n"
            "# A user who submits from a laptop needs the same verbs in this namespace.\n",
            render.render_driver_rbac(k.namespace),
        ),
        "kustomization.yaml": (
            "# The set-up (make k8s-apply: kubectl apply -k k8s/). Only what is listed here is applied: never\n"
            "# templates/ (a Secret applied from its template would overwrite the real token) nor the nightly CronJob.\n",
            [kustomization(["namespace.yaml", "pvc.yaml", "rbac.yaml"])],
        ),
        "nightly/kustomization.yaml": (
            "# The nightly schedule, apart from the set-up: `make nightly RECIPE=... SCHEDULE=...` writes cronjob.yaml\n"
            "# (vlmjobs cronjob: the recipe, its image, the schedule; not committed) and applies this folder.\n",
            [kustomization(["cronjob.yaml"])],
        ),
        "templates/hf-token-secret.yaml": (
            "# The shape of the HF_TOKEN Secret the stage Jobs read (kubernetes.hf_token_secret/hf_token_key).\n"
            "# Do not fill in and commit this file; create the Secret from your shell instead:\n"
            f"#   kubectl -n {k.namespace} create secret generic {k.hf_token_secret or 'hf-token'} "
            f'--from-literal={k.hf_token_key}="$HF_TOKEN"\n',
            [render.render_hf_token_secret(k.namespace, k.hf_token_secret or "hf-token", k.hf_token_key)],
        ),
        "examples/kueue-localqueue.yaml": (
            "# For clusters with Kueue: set kubernetes.queue to this queue's name and the Jobs wait in it,\n"
            "# admitted whole (all the nodes of a multi-node stage at once). The ClusterQueue is the admin's.\n"
            "# kueue.x-k8s.io/v1beta2: served and stored from Kueue 0.15 (v1beta1 is deprecated in 0.17).\n",
            [render.render_local_queue(k.namespace, k.queue or "vlmjobs", cluster_queue)],
        ),
    }


def kustomization(resources: list[str]) -> dict:
    return {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "resources": resources}


def text(header: str, manifests: list[dict]) -> str:
    return GENERATED + header + render.dump(manifests)


def write(out: Path, k: Kubernetes, **options) -> list[Path]:
    written = []
    for relative, (header, manifests) in files(k, **options).items():
        path = out / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text(header, manifests))
        written.append(path)
    return written
