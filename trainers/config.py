"""Typed sections of the configuration that Ray Train workers need (data, model, recipes).

They live here, not in orchestrator/, because workers rebuild the typed config from the dict
they receive (`TrainConfig.model_validate`) and trainers/ must not import orchestrator/. The
orchestrator's `Config` extends `TrainConfig` with what only the driver needs.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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
    loader_workers: int = Field(0, ge=0)
    augment: bool = True
    synthetic_size: int = Field(512, ge=8, description="images in the synthetic data set")


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


class SearchConfig(_Section):
    """The search phase (OFB defaults from METHODS.md; fewer epochs for small models)."""

    method: str = "ofb"
    budget: float = Field(0.5, gt=0, le=1, description="target MACs / dense MACs")
    target_gmacs: float | None = Field(None, gt=0, description="absolute target; wins over budget")
    epochs: float = Field(6, gt=0, description="cap: at the cap every module takes its argmax")
    warmup_epochs: float = Field(1, ge=0, description="lambda and mask-ratio ramp")
    lr: float = Field(5e-4, gt=0, description="weights and importance scores S")
    alpha_lr: float = Field(5e-3, gt=0, description="architecture logits alpha")
    min_lr: float = Field(1e-5, ge=0)
    weight_decay: float = Field(1e-3, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    grad_clip: float | None = Field(5.0, gt=0)
    temperature: float = Field(1.0, gt=0, description="one-hot temperature: softmax(alpha / T)")
    width_multiple: int = Field(1, ge=1, description="only candidate widths that are multiples"
                                " of this (8: hardware-friendly); 1 = the published lists")
    mask_ratio: float = Field(0.25, ge=0, lt=1, description="PMIM ratio after the warm-up")
    mask_ratio_start: float = Field(0.05, ge=0, lt=1)
    lambda_start: float = Field(0.99, ge=0, le=1)
    lambda_end: float = Field(0.1, ge=0, le=1)
    macs_loss_weight: float = Field(5.0, ge=0)
    macs_tolerance: float | None = Field(
        0.02, gt=0, description="decide only while |expected - target| MACs <= this x dense MACs; "
        "null = always (as published)")
    eliminations_per_epoch: int = Field(3, ge=1)
    elimination_factor: float = Field(0.2, gt=0, lt=1)
    # two-stage pruners (two_stage_taylor, two_stage_magnitude)
    score_batches: int = Field(32, ge=1, description="batches of |w * grad| (Taylor scoring)")
    allocation: Literal["global", "uniform"] = Field(
        "global", description="global: budget-aware ranking across modules; uniform: the same "
        "fraction in every module")
    prune_embed: bool = Field(True, description="two-stage: prune embedding channels too")
    # ViT-Slim (l1 weights of METHODS.md section 2, DeiT-S values)
    slim_l1_attn: float = Field(2e-4, ge=0, description="ViT-Slim: l1 weight on |zeta_attn|")
    slim_l1_mlp: float = Field(5e-5, ge=0, description="ViT-Slim: l1 weight on |zeta_mlp|")
    slim_tokens: bool = Field(False, description="ViT-Slim: also search token positions "
                              "(monotone over depth; the subnet drops pruned positions)")
    slim_l1_tok: float = Field(1e-4, ge=0, description="ViT-Slim: l1 weight on |tanh zeta_tok|")

    @field_validator("method")
    @classmethod
    def _registered(cls, v: str) -> str:
        from trainers.methods import list_methods  # the registry imports no config

        if v not in list_methods():
            raise ValueError(f"search.method={v!r}; allowed: {list_methods()}")
        return v


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
