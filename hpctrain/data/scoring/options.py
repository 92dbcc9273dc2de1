"""What `hpctrain score` computes and from what, checked before any model is built (no torch)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from hpctrain.errors import UserError

METHODS = ("loss", "el2n", "grand", "forgetting", "feature-density")


@dataclass(frozen=True)
class ScoreOptions:
    """A scoring run; a combination that cannot work fails here, in one line, at construction."""
    data: str                                 # shard directory, or any data.name (then give `out`)
    methods: tuple[str, ...]                  # some of METHODS; one model serves them all
    checkpoint: str | None = None             # score with this model, else short pre-training runs
    extractor: str | None = None              # feature-density: a frozen extractor instead of the model
    extractor_state: str | None = None        # state dict for a module:factory extractor
    config: str | None = None                 # run config of the short pre-training runs
    overrides: tuple[str, ...] = ()           # SECTION.KEY=VALUE over that config
    epochs: int = 5                           # of each short pre-training run
    seeds: int = 1                            # short runs averaged, seeded run.seed, run.seed + 1, ...
    density: str = "knn"                      # feature-density measure: "knn" or "centroid"
    k: int = 10                               # neighbours for density "knn"
    out: str | None = None                    # scores file (default DATA/scores.h5)

    def __post_init__(self) -> None:
        if "forgetting" in self.methods and self.checkpoint:
            raise UserError("--method forgetting records its own short training run; drop --checkpoint "
                            "(or score forgetting separately)")
        if self.extractor and "feature-density" not in self.methods:
            raise UserError("--extractor is the embedding for --method feature-density; add that method or drop --extractor")
        if self.extractor_state and not self.extractor:
            raise UserError("--extractor-state needs --extractor module:factory")
        if self.epochs < 1:
            raise UserError(f"--epochs {self.epochs} must be at least 1")
        if self.seeds < 1:
            raise UserError(f"--seeds {self.seeds} must be at least 1")
        if self.seeds > 1 and self.checkpoint:
            raise UserError(f"--seeds {self.seeds} averages short pre-training runs; a --checkpoint is one model, "
                            f"drop one of them")
        if self.seeds > 1 and not self.needs_model:
            raise UserError(f"--seeds {self.seeds} averages short pre-training runs, but feature-density with "
                            f"--extractor trains none; drop --seeds")

    @property
    def needs_model(self) -> bool:
        """Every method but feature-density with its own extractor scores with a (trained) model."""
        return set(self.methods) != {"feature-density"} or not self.extractor

    def out_path(self) -> Path:
        """Where the scores go: `out`, else scores.h5 inside the shard directory."""
        if self.out:
            return Path(self.out)
        if not Path(self.data).is_dir():
            raise UserError(f"--data {self.data} is not a shard directory; pass --out SCORES.h5 for where to write scores")
        return Path(self.data) / "scores.h5"
