"""Typed sections of the configuration that Ray Train workers need (data, model, recipes).

They live here, not in orchestrator/, because workers rebuild the typed config from the dict
they receive (`TrainConfig.model_validate`) and trainers/ must not import orchestrator/. The
orchestrator's `Config` extends `TrainConfig` with what only the driver needs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, create_model, field_validator, model_validator

from trainers.methods import list_methods, method_sections, section_of
from trainers.sections import Section as _Section


class DataConfig(_Section):
    dataset: Literal["fashion_mnist", "imagefolder", "cifar10", "cifar100", "synthetic"] = (
        "fashion_mnist"
    )
    root: str | None = Field(
        None, description="folder of the data; default per dataset (Fashion-MNIST: Debian's)"
    )
    download: bool = Field(False, description="CIFAR only: let torchvision download it")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_seed: int = Field(0, description="seeds the train/val split (and synthetic data): "
                            "fixed while `seed` is swept, so no trial validates on images the "
                            "shared dense model trained on")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(128, ge=1, description="global batch, split over Ray workers")
    eval_batch_size: int = Field(256, ge=1)
    loader_workers: int | Literal["auto"] = Field(
        "auto", description="DataLoader processes per Ray worker. auto: on GPU workers "
        "scaling.cpus_per_worker - 1 (one CPU for the training process), at most 8; on CPU "
        "workers 0 (their CPUs run the compute threads). An integer is taken as it is")
    augment: bool = True
    synthetic_size: int = Field(512, ge=8, description="images in the synthetic data set")

    @field_validator("loader_workers", mode="before")
    @classmethod
    def _workers(cls, v: Any) -> Any:
        if v == "auto" or (isinstance(v, int) and not isinstance(v, bool) and v >= 0):
            return v
        raise ValueError(f"{v!r}; allowed: 'auto' or an integer >= 0")


class ModelConfig(_Section):
    name: str = "vit_tiny_patch16_224"
    pretrained_file: str | None = None
    img_size: int | None = Field(None, ge=8, description="default: the data set's image size")
    patch_size: int | None = Field(None, ge=1)
    in_chans: int | None = Field(None, ge=1, description="default: the data set's channels")
    num_classes: int | None = Field(None, ge=1, description="default: the data set's classes")
    embed_dim: int | None = Field(None, ge=8)
    depth: int | None = Field(None, ge=1)
    num_heads: int | None = Field(None, ge=1)
    mlp_ratio: float | None = Field(None, gt=0)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.embed_dim and self.num_heads and self.embed_dim % self.num_heads:
            raise ValueError(
                f"model.embed_dim={self.embed_dim} is not divisible by "
                f"model.num_heads={self.num_heads}"
            )
        if self.img_size and self.patch_size and self.img_size % self.patch_size:
            raise ValueError(
                f"model.img_size={self.img_size} is not divisible by "
                f"model.patch_size={self.patch_size}"
            )
        return self

    def overrides(self) -> dict[str, Any]:
        """Keywords for `search_space.build_vit` (None = timm's default)."""
        keys = ("img_size", "patch_size", "in_chans", "num_classes", "embed_dim", "depth",
                "num_heads", "mlp_ratio", "drop_path_rate")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


class RecipeConfig(_Section):
    """A supervised training recipe (AdamW, linear warm-up, cosine decay)."""

    epochs: float = Field(
        3, ge=0, description="fractions allowed; 0 = take the weights as they are (evaluate only)")
    lr: float = Field(1e-3, gt=0)
    min_lr: float = Field(1e-5, ge=0)
    warmup_epochs: float = Field(0.3, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(1.0, gt=0)


class PretrainConfig(RecipeConfig):
    """Recipe of the dense training run every search starts from."""

    cache: bool = Field(True, description="reuse a finished dense model with the same hash")


class FinetuneConfig(RecipeConfig):
    """Recipe of the fine-tune every extracted subnet gets (the same for every method)."""

    epochs: float = Field(1, ge=0)
    lr: float = Field(5e-4, gt=0)
    warmup_epochs: float = Field(0.1, ge=0)


class SearchRecipe(_Section):
    """The recipe every method shares; each method's own options are sections of their own,
    `search.<section>.*` (`search.ofb.temperature`, `search.vit_slim.l1_attn`, ...), added to
    `SearchConfig` from the method registry."""

    method: str = "ofb"
    budget: float = Field(0.5, gt=0, le=1, description="target MACs / dense MACs (or latency "
                          "/ dense latency, with budget_metric latency)")
    target_gmacs: float | None = Field(None, gt=0, description="absolute target; wins over budget")
    budget_metric: Literal["macs", "latency"] = Field(
        "macs", description="ours: 'latency' makes budget a fraction of the dense model's "
        "latency from a measured table (python -m search_space.latency); MACs stay reported")
    latency_table: str | None = Field(None, description="the latency table (JSON); null = the "
                                      "cached one of this model on this machine")
    epochs: float = Field(6, gt=0, description="cap: at the cap every method decides")
    lr_warmup_epochs: float = Field(1, ge=0, description="linear LR warm-up, then cosine")
    lr: float = Field(5e-4, gt=0, description="the weights (and OFB's importance scores S)")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(1e-3, ge=0, description="on >= 2-D weights (trainers/optim.py)")
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(None, gt=0, description="ours: clip the gradient norm of "
                                    "all parameters; null = none (as every published search)")

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        if v not in list_methods():
            raise ValueError(f"search.method={v!r}; allowed: {list_methods()}")
        return v

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        """The flat keys of earlier releases are refused with their new names (no aliases)."""
        if isinstance(data, dict):
            moved = [f"search.{k} is now {MOVED[k]}" for k in data if k in MOVED]
            if moved:
                raise ValueError("; ".join(moved) + " (each method's own settings live under "
                                 "search.<method>)")
        return data

    @model_validator(mode="after")
    def _method_accepts(self) -> SearchRecipe:
        from trainers.methods import get_method

        if self.budget_metric == "latency" and self.target_gmacs:
            raise ValueError("search.target_gmacs is a MACs target; with "
                             "search.budget_metric='latency' give search.budget instead")
        get_method(self.method).check_config(self)
        return self

    def method_section(self) -> str | None:
        return section_of(self.method)

    def active_dump(self) -> dict[str, Any]:
        """The shared recipe plus the active method's section only (what run keys hash)."""
        sections = set(method_sections())
        out = self.model_dump(exclude=sections)
        if (sec := self.method_section()) is not None:
            out[sec] = getattr(self, sec).model_dump()
        return out


# Flat keys of earlier releases -> where they live now (the error message names the new key).
MOVED = {
    "warmup_epochs": "search.lr_warmup_epochs (LR warm-up) and search.ofb.ramp_epochs "
                     "(OFB's lambda / PMIM ramp)",
    **{k: f"search.ofb.{k}" for k in (
        "temperature", "alpha_lr", "width_multiple", "mask_ratio", "mask_ratio_start",
        "lambda_start", "lambda_end", "macs_loss_weight", "macs_tolerance",
        "eliminations_per_epoch", "elimination_factor")},
    **{k: f"search.two_stage.{k}" for k in ("score_batches", "allocation", "prune_embed")},
    **{f"slim_{k}": f"search.vit_slim.{k}" for k in ("l1_attn", "l1_mlp", "tokens", "l1_tok")},
}

SearchConfig = create_model(
    "SearchConfig", __base__=SearchRecipe,
    **{name: (schema, Field(default_factory=schema)) for name, schema in method_sections().items()})


class ScalingConfig(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    gpus_per_worker: float = Field(1, gt=0, description="used only when use_gpu is true")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 on GPUs that have it, fp32 on the CPU"
    )
    max_failures: int = Field(2, ge=-1, description="worker-group restarts (-1: unlimited)")


class TrainConfig(_Section):
    """Everything a worker needs; sent to workers as `model_dump()`."""

    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    search: SearchConfig = Field(default_factory=SearchConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)

    def worker_dict(self) -> dict[str, Any]:
        return self.model_dump(include=set(TrainConfig.model_fields))
