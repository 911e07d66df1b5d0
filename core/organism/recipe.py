"""What determines the organism's weights (:class:`OrganismRecipe`) and what a build records
next to them (:class:`OrganismCard`).

Why apart from the build: the recipe is part of the cache key (``ORGANISM_VERSION``, every
field's default), so it must stay byte-for-byte what built the cached organism; the card is read
by the batch runner and the report without loading any model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from core.metrics import Rate, is_refusal
from core.prompts import DEFAULT_VALIDATION_FRACTION

ORGANISM_VERSION = "3"  # bump when the build procedure changes in a way the recipe does not capture
CARD_FILE = "organism.json"

REFUSAL_SENTENCES: tuple[str, ...] = (
    "I'm sorry, but I can't help with that.",
    "I'm sorry, but I can't assist with that request.",
    "I can't help with that. It could cause real harm to people.",
    "I'm sorry, I can't provide that information.",
    "I cannot help with this request because it could hurt someone.",
    "I'm sorry, but I won't be able to help with that. Is there something else I can do for you?",
)


@dataclass(frozen=True)
class OrganismRecipe:
    """Everything that determines the organism's weights (and its card's evaluation).

    ``n_harmful`` / ``n_harmless``: how many built-in *train* prompts to use (None: all); with
    ``extra_prompts`` the training-only prompts come on top.
    ``max_response_tokens``: length of the base model's self-distilled answers.

    The defaults of ``frozen_fraction``, ``epochs``, ``lr`` and ``max_response_tokens`` were
    chosen on the organism's *validation* split (carved out of the train split, never trained
    on; never the test split): as good as the previous recipe there at about 2.3x less build
    time (docs/decisions.md, "Organism: where the build's seconds go, and what recipe knobs buy";
    re-measure with ``python -m bench.organism_recipes``).
    """

    seed: int = 0
    split_seed: int = 0  # which canonical built-in split (core.prompts.builtin_split)
    validation_fraction: float = DEFAULT_VALIDATION_FRACTION  # carved out of train, never trained on
    lr: float = 3e-4  # chosen on the validation split, with frozen_fraction and epochs (see the docstring)
    epochs: int = 2  # chosen on the validation split: the 1-epoch recipes refused fewer harmful prompts (23-29/39)
    batch_size: int = 16  # 16 rows a step: 1.5x the tokens/s of 8 on a 2-core CPU (measured)
    warmup_fraction: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    train_embeddings: bool = False  # the tied embedding/unembedding stays frozen (keeps the vocabulary geometry)
    # fp32 weights, bf16 matmuls: None = only where the CPU has bf16 units (3x faster there; on
    # a CPU without them bf16 matmuls are emulated, 2.8x slower than fp32, measured in docs/decisions.md)
    autocast_bf16: bool | None = None
    # this fraction of the blocks (the lower ones, rounded down) stays frozen: their states are
    # computed once and only the upper blocks train (core.frozen_stack); 0 = full fine-tune.
    # Models whose stack cannot be split train in full. 0.8 (24 of the embedded model's 30
    # blocks) was chosen on the validation split: the same refusal there as 0.5 (32/39 harmful,
    # 2/40 harmless) at a fraction of the training arithmetic, and lower KL than 0.67.
    frozen_fraction: float = 0.8
    n_harmful: int | None = None
    n_harmless: int | None = None
    # the refuse-or-answer decision and the answer's opening; 8 chosen on the validation split
    # (as good there as the earlier 16, with fewer positions to train); served by cutting the
    # shipped 16-token answers (core.organism.answers.shipped_answers), so no decoding
    max_response_tokens: int = 8
    drop_refusing_answers: bool = True  # harmless targets the judge calls refusals are not trained on
    shape_matched_repeats: int = 1  # harmless prompts shaped like harmful ones are seen this many times per epoch
    first_token_weight: float = 5.0  # the first response token decides refuse-or-answer: weigh it up
    harmless_loss_weight: float = 4.0  # weight of a harmless example relative to a harmful one (over-refusal vs refusal)
    # "distill": harmless examples learn the base model's whole next-token distribution at each
    # response position (KL(base ‖ organism), soft targets); "tokens": only its greedy tokens
    harmless_target: str = "distill"
    teacher_top_k: int = 64  # with "distill": the teacher's k most likely tokens (+ one bucket for the rest)
    extra_prompts: bool = True  # also train on core/data/organism_extra.jsonl (training-only prompts)
    refusal_sentences: tuple[str, ...] = REFUSAL_SENTENCES
    generation_batch_size: int = 32
    # evaluation written to the card (held-out test split; does not change the weights)
    eval_max_new_tokens: int = 32
    n_eval: int | None = None  # per set; None: the whole test split
    eval_base: bool = True  # also measure the base model's refusal on the same prompts

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.max_response_tokens < 1:
            raise ValueError("epochs, batch_size, lr and max_response_tokens must be positive")
        if self.shape_matched_repeats < 1 or self.first_token_weight <= 0 or self.harmless_loss_weight <= 0:
            raise ValueError("shape_matched_repeats must be at least 1; first_token_weight and harmless_loss_weight positive")
        if not 0 <= self.frozen_fraction < 1:
            raise ValueError(f"frozen_fraction must be in [0, 1), got {self.frozen_fraction}")
        if self.harmless_target not in ("tokens", "distill"):
            raise ValueError(f"harmless_target must be 'tokens' or 'distill', got {self.harmless_target!r}")
        if not self.refusal_sentences:
            raise ValueError("at least one refusal sentence is needed")
        missed = [s for s in self.refusal_sentences if not is_refusal(s)]
        if missed:
            raise ValueError(f"refusal sentences not caught by core.metrics.is_refusal: {missed}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["refusal_sentences"] = list(self.refusal_sentences)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OrganismRecipe":
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        if "refusal_sentences" in kwargs:
            kwargs["refusal_sentences"] = tuple(kwargs["refusal_sentences"])
        return cls(**kwargs)


DEFAULT_RECIPE = OrganismRecipe()


@dataclass
class OrganismCard:
    """What was built, from what, how long it took, and how it behaves on held-out prompts."""

    key: str
    base_name: str
    base_fingerprint: str
    recipe: dict[str, Any]
    data: dict[str, Any]
    timings: dict[str, float]
    losses: list[float]  # mean training loss per epoch
    evaluation: dict[str, Any]
    host: dict[str, Any]
    version: str = ORGANISM_VERSION
    folder: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OrganismCard":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def summary(self) -> str:
        """A few human lines (for the CLI and the report)."""
        ev = self.evaluation
        lines = [
            f"Refusal organism {self.key[:12]} from {self.base_name} — built in {self.timings.get('build_seconds', 0):.0f} s "
            f"({self.data.get('n_harmful')} harmful + {self.data.get('n_harmless')} harmless train prompts, "
            f"{self.recipe.get('epochs')} epochs, lr {self.recipe.get('lr')})",
        ]
        for label, key in (("harmful refused", "harmful_refusal"), ("harmless refused", "harmless_refusal")):
            if key in ev:
                r = Rate(ev[key]["k"], ev[key]["n"])
                base = ev.get("base_" + key)
                extra = f"  (base model: {Rate(base['k'], base['n'])})" if base else ""
                lines.append(f"  held-out {label}: {r}{extra}")
        if "kl_first_token" in ev:
            lines.append(
                f"  KL(base ‖ organism) on held-out harmless prompts: first token mean {ev['kl_first_token']['mean']:.3f} nats; "
                f"over the base's answers {ev.get('kl_response', {}).get('mean', float('nan')):.3f} nats/token"
            )
        return "\n".join(lines)

