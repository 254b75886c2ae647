"""The model registry: deployable bundles as versions of a registered model, under aliases."""

from __future__ import annotations

from typing import Any


def register(client: Any, uri: str, run: str, model: str, alias: str, path: str, digest: str,
             tags: dict, description: str) -> str:  # fmt: skip
    """``path`` as a version of ``model`` with ``alias`` on it; a version already registered
    with the same ``edgepc.sha256`` is reused (a rerun moves the alias, adds no copy)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model, description="edgepc deployable artifacts")
    found = client.search_model_versions(f"name = '{model}' and tags.`edgepc.sha256` = '{digest}'")
    if found:
        version = str(max(int(v.version) for v in found))
    else:
        client.log_artifacts(run, path, f"registry/{alias}")
        created = client.create_model_version(
            model, f"runs:/{run}/registry/{alias}", run_id=run, tags=tags, description=description
        )
        version = str(created.version)
    client.set_registered_model_alias(model, alias, version)
    return version
