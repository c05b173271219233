"""The report's opening summary: which family wins at what, in sentences made from the measured rows.

One sentence per aspect (sample quality, likelihood, reconstruction, sampling cost, training cost),
each naming the best model row, its value and how far the next one is; every number is read from the
rows. A value is compared as the reader sees it (at the precision the sentence prints), so models
that print the same number tie and are named together; models without a value (None, NaN, or a key
the row lacks) are named as such; an aspect no model measured says so.
"""

from __future__ import annotations

import math


def _num(v: float) -> str:
    """Three significant figures, without exponent for the sizes reported here."""
    a = abs(v)
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"


def _more(ratio: float, higher: str, times: str) -> str:
    """How much a value `ratio` times the best is: "(12% higher)" below 2x, "(3.4× as high)" above."""
    if ratio < 2:
        return f" ({ratio - 1:.0%} {higher})"
    return f" ({ratio:.1f}× {times})" if ratio < 10 else f" ({ratio:,.0f}× {times})"


def _names(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def ranked(rows: list[dict], key: str) -> tuple[list[tuple[str, float]], list[str]]:
    """(model rows with a finite `key` as (name, value, row index), lowest first; names of model rows
    without one)."""
    have, missing = [], []
    for i, r in enumerate(rows):
        if r["kind"] != "model":
            continue
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            have.append((r["name"], float(v), i))
        else:
            missing.append(r["name"])
    return sorted(have, key=lambda p: p[1]), missing


def _lowest(have: list[tuple[str, float]]) -> tuple[list[str], float, tuple[str, float] | None]:
    """(names tied for the lowest value as printed, in the rows' order; the lowest value; the first
    model after them, or None)."""
    shown = _num(have[0][1])
    tied = [p for p in have if _num(p[1]) == shown]
    rest = have[len(tied):]
    return [p[0] for p in sorted(tied, key=lambda p: p[2])], have[0][1], rest[0] if rest else None


def _verb(names: list[str], one: str, many: str) -> str:
    return one if len(names) == 1 else many


def _best_sentence(have, what: str, note: str = "") -> str:
    """"X has the lowest <what>, v; next Y, w (p% higher)", models tied at the lowest value named together."""
    tied, best, nxt = _lowest(have)
    lead = f"{_names(tied)} {_verb(tied, 'has', 'tie for')} the lowest {what}, {_num(best)}{note}"
    if nxt is None:
        return lead
    ratio = _more(nxt[1] / best, "higher", "as high") if best > 0 else ""
    return f"{lead}; next {nxt[0]}, {_num(nxt[1])}{ratio}"


def _none_for(missing: list[str], what: str) -> str:
    return f" {_names(missing)} {_verb(missing, 'has', 'have')} no {what}." if missing else ""


def quality(rows: list[dict]) -> str:
    have, missing = ranked(rows, "fd")
    if not have:
        return "No model has a measured FD."
    refs = [f"{r['name']} {_num(r['fd'])}" for r in rows if r["kind"] == "reference"
            and isinstance(r.get("fd"), (int, float)) and math.isfinite(r["fd"])]
    text = _best_sentence(have, "FD", " (Fréchet distance of samples to the test set)") + "."
    return text + (f" For scale: {'; '.join(refs)}." if refs else "") + _none_for(missing, "FD")


def likelihood(rows: list[dict]) -> str:
    have, missing = ranked(rows, "bits_per_dim")
    if not have:
        return "No model reports a likelihood (bits/dim)."
    return (_best_sentence(have, "bits/dim", " (an upper bound on the test negative log-likelihood)") + "."
            + _none_for(missing, "likelihood"))


def reconstruction(rows: list[dict]) -> str:
    mse, missing = ranked(rows, "mse")
    if not mse:
        return "No model reconstructs test images."
    rfd, _ = ranked(rows, "recon_fd")
    text = _best_sentence(mse, "reconstruction error", " (MSE per pixel)") + "."
    if rfd:
        tied, best, _ = _lowest(rfd)
        same = set(tied) == set(_lowest(mse)[0])
        text += (f" {_names(tied)} also {_verb(tied, 'has', 'share')} the most realistic reconstructions "
                 f"(rFD {_num(best)})." if same else f" The most realistic reconstructions, by rFD: {_names(tied)}, {_num(best)}.")
    return text + (f" {_names(missing)} {_verb(missing, 'does', 'do')} not reconstruct." if missing else "")


def _cost(rows: list[dict], key: str, fastest: tuple[str, str], slowest: str, unit: str, what: str) -> str:
    """"X <fastest>, v <unit>; Y <slowest>, w <unit> (r× as long)"; `fastest` is (one, many) for ties."""
    have, missing = ranked(rows, key)
    if not have:
        return f"No model has a measured {what}."
    tied, best, _ = _lowest(have)
    text = f"{_names(tied)} {_verb(tied, *fastest)}, {_num(best)} {unit}"
    worst_name, worst, _ = have[-1]
    if _num(worst) != _num(best):
        ratio = _more(worst / best, "longer", "as long") if best > 0 else ""
        text += f"; {worst_name} {slowest}, {_num(worst)} {unit}{ratio}"
    return text + "." + _none_for(missing, what)


def summary(rows: list[dict]) -> list[tuple[str, str]]:
    """(aspect, sentence) for the report's opening; empty when there are no model rows."""
    if not any(r["kind"] == "model" for r in rows):
        return []
    return [
        ("Sample quality", quality(rows)),
        ("Likelihood", likelihood(rows)),
        ("Reconstruction", reconstruction(rows)),
        ("Sampling cost", _cost(rows, "sample_ms_per_image", ("samples fastest", "sample fastest"), "is slowest",
                                "ms per image", "sampling time")),
        ("Training cost", _cost(rows, "train_wall_time_s", ("trained fastest", "trained fastest"), "took longest",
                                "s", "training time")),
    ]
