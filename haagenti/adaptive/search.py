"""Searched schedules: from measured per-step sensitivity and a weight-bytes budget, the
schedule with the least predicted quality loss.

The loss of a schedule is predicted as the sum, over windows of steps, of the MSE (vs FP32
samples) that quantising that window alone adds: TMPDiff's additive-error assumption, which
`bench/adaptive.py` checks against measured schedules. Under it the problem is a knapsack over
windows with one of INT4/INT8/FP16 each (and INT5/INT6 where the sensitivity measured them); a
DP that keeps the (bytes, loss) Pareto frontier of every prefix solves it exactly."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from importlib import resources

from haagenti.adaptive.precision import AdaptiveError, Precision
from haagenti.adaptive.presets import ProfilePreset
from haagenti.adaptive.profile import INF, PrecisionProfile, PrecisionZone

CHOICES = (Precision.INT4, Precision.INT8, Precision.FP16)  # every sensitivity measures these
OPTIONAL = (Precision.INT5, Precision.INT6)  # library tiers (0390), offered where measured


@dataclass(frozen=True)
class Sensitivity:
    """What one sampler on one model measured: for each window of steps and each precision, the
    MSE vs FP32 samples added by running that window alone at that precision (FP16: the all-FP16
    loss spread over windows by length), and each precision's weight bytes relative to FP16."""

    model: str
    sampler: str
    steps: int
    windows: tuple[tuple[int, int], ...]  # [start, end) step ranges
    bytes_vs_fp16: dict[str, float]
    loss: dict[str, tuple[float, ...]]  # precision -> per-window MSE added
    samples: int = 0

    def __post_init__(self) -> None:
        starts = [0] + [b for _, b in self.windows[:-1]]
        if [a for a, _ in self.windows] != starts or self.windows[-1][1] != self.steps or any(b <= a for a, b in self.windows):
            raise AdaptiveError("sensitivity windows must tile the steps in order")
        for p in CHOICES:
            if len(self.loss.get(p.value, ())) != len(self.windows) or p.value not in self.bytes_vs_fp16:
                raise AdaptiveError(f"sensitivity for {self.model}/{self.sampler} lacks {p.value} for every window")

    @property
    def choices(self) -> tuple[Precision, ...]:
        """The precisions a window may take: CHOICES and each OPTIONAL one measured for every window."""
        extra = tuple(p for p in OPTIONAL if len(self.loss.get(p.value, ())) == len(self.windows) and p.value in self.bytes_vs_fp16)
        return CHOICES + extra

    def predicted(self, choice: tuple[Precision, ...]) -> float:
        return sum(self.loss[p.value][k] for k, p in enumerate(choice))

    def bytes_of(self, choice: tuple[Precision, ...]) -> float:
        return sum((b - a) / self.steps * self.bytes_vs_fp16[p.value] for (a, b), p in zip(self.windows, choice))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sensitivity":
        return cls(d["model"], d["sampler"], d["steps"], tuple(tuple(w) for w in d["windows"]), dict(d["bytes_vs_fp16"]),
                   {k: tuple(v) for k, v in d["loss"].items()}, d.get("samples", 0))


@dataclass(frozen=True)
class SearchResult:
    choice: tuple[Precision, ...]  # one precision per window
    weight_bytes_vs_fp16: float
    predicted_mse: float
    sensitivity: Sensitivity

    def profile(self, name: str) -> PrecisionProfile:
        """The choice as zones on step fraction, so it plans at any step count."""
        zones: list[PrecisionZone] = []
        for (a, b), p in zip(self.sensitivity.windows, self.choice):
            lo, hi = a / self.sensitivity.steps, b / self.sensitivity.steps
            if zones and zones[-1].precision is p:
                zones[-1] = PrecisionZone(zones[-1].start, hi, p)
            else:
                zones.append(PrecisionZone(lo, hi, p))
        return PrecisionProfile(name, tuple(zones))


def frontier(sens: Sensitivity) -> list[SearchResult]:
    """Every Pareto-optimal choice (no other is both cheaper and better), cheapest first."""
    front: list[tuple[float, float, tuple[Precision, ...]]] = [(0.0, 0.0, ())]
    for k, (a, b) in enumerate(sens.windows):
        share = (b - a) / sens.steps
        grown = sorted((nb + share * sens.bytes_vs_fp16[p.value], nl + sens.loss[p.value][k], ch + (p,)) for nb, nl, ch in front for p in sens.choices)
        front, best = [], float("inf")
        for item in grown:
            if item[1] < best - 1e-15:
                front.append(item)
                best = item[1]
    return [SearchResult(ch, nb, nl, sens) for nb, nl, ch in front]


def search(sens: Sensitivity, budget: float) -> SearchResult:
    """The least predicted loss within `budget` (weight bytes touched / all-FP16)."""
    fits = [r for r in frontier(sens) if r.weight_bytes_vs_fp16 <= budget + 1e-9]
    if not fits:
        floor = min(sens.bytes_vs_fp16[p.value] for p in CHOICES)
        raise AdaptiveError(f"no schedule fits {budget:.0%} of all-FP16 weight bytes on {sens.model}/{sens.sampler}: all-INT4 already touches {floor:.1%}")
    return min(fits, key=lambda r: r.predicted_mse)


def measured(path: str | None = None) -> dict[tuple[str, str], Sensitivity]:
    """The measured sensitivities by (model, sampler): from `path` (a file `haagenti schedule
    evaluate` wrote) or the copy shipped with haagenti (docs/adaptive.md gives its run)."""
    if path is None:
        text = resources.files("haagenti.adaptive").joinpath("sensitivity.json").read_text()
    else:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            raise AdaptiveError(f"cannot read sensitivity file {path}: {e.strerror}") from None
    try:
        rows = json.loads(text)["sensitivity"]
        out = {}
        for r in rows:
            s = Sensitivity.from_dict(r)
            out[(s.model, s.sampler)] = s
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise AdaptiveError(f"{path or 'the shipped sensitivity'} is not a sensitivity file ({type(e).__name__}: {e})") from None


def preset_profile(preset: ProfilePreset, sampler: str = "ddim", model: str = "unet", sensitivity: str | None = None) -> PrecisionProfile:
    """The preset's profile: the searched choice at its budget on the measured sensitivity of
    `model`/`sampler` (from `sensitivity`, a file, or the shipped copy); NOISE_ADAPTIVE's zones
    are on noise level instead."""
    if preset is ProfilePreset.NOISE_ADAPTIVE:
        # sigma = sqrt((1 - a_bar) / a_bar): above 20 the latent is almost pure noise.
        P = Precision
        return PrecisionProfile.by_sigma("noise_adaptive", (-INF, 1.0, P.INT4), (1.0, 20.0, P.INT8), (20.0, INF, P.FP16))
    return search(sensitivity_of(model, sampler, sensitivity), preset.budget).profile(preset.value)


def sensitivity_of(model: str, sampler: str, sensitivity: str | None = None) -> Sensitivity:
    """The measured sensitivity of `model`/`sampler` (from `sensitivity`, a file, or the shipped
    copy); refused in one line when it was not measured."""
    table = measured(sensitivity)
    if (model, sampler) not in table:
        raise AdaptiveError(f"no measured sensitivity for {model}/{sampler}; have {', '.join(f'{m}/{s}' for m, s in sorted(table))}")
    return table[model, sampler]
