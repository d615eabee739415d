"""The method configurations `scripts/bench_convergence.py` names: each resolves to what its name says."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_convergence import CANDIDATES  # noqa: E402

from difftune_control.cli import _config, build_parser  # noqa: E402
from difftune_control.config import resolve_defaults  # noqa: E402


def _resolved(flags: list[str]):
    """The toy-world run config these flags give (model-dependent defaults filled in)."""
    return resolve_defaults(_config(build_parser().parse_args(["train", *flags])), toy=True)


def _method(flags: list[str]):
    return _resolved(flags).method


def test_the_default_candidate_is_the_cli_default_and_pull10_spells_it_out():
    default = _resolved(CANDIDATES["default"])
    assert default.to_dict() == _resolved([]).to_dict()
    # the searches measured the default under this name (BENCHMARKS.md 0f)
    spelled = _resolved(CANDIDATES["null-auto-isnr-sample-pull10"])
    assert (spelled.method, spelled.bank) == (default.method, default.bank)
    m = default.method
    assert (m.method, m.loss_weighting, m.bank_weight, m.bank_pull, m.bank_latents, default.bank.bank_hint) == (
        "difftuning", "inverse_snr", "auto", 0.1, "sample", "zero",
    )  # fmt: skip


@pytest.mark.parametrize(
    "name, field, value",
    [
        ("null-auto-isnr-sample", "bank_pull", 0.5),
        ("null-auto-isnr-sample-pull25", "bank_pull", 0.25),
        ("null-auto-isnr-sample-pull05", "bank_pull", 0.05),
        ("null-auto-isnr-sample-pull25-once", "bank_pull_every", 0),
        ("vanilla", "method", "vanilla"),
        ("inverse-snr", "loss_weighting", "inverse_snr"),
        ("published-sample", "bank_weight", 0.1),
    ],
)
def test_named_candidates_set_what_their_names_say(name, field, value):
    assert getattr(_method(CANDIDATES[name]), field) == value


def test_the_default_candidate_runs_the_default_method():
    import argparse

    from bench_convergence import jobs, train_cmd

    args = argparse.Namespace(
        ablations=False, candidates=["default"], conditions=["depth"], seeds=[3], out=Path("/tmp/x"),
        max_train_steps=10, convergence_every=5, train_args=[],
    )  # fmt: skip
    [(name, condition, method, seed, extra)] = jobs(args)
    assert (name, condition, method, seed, extra) == ("depth-default-s3", "depth", "difftuning", 3, [])
    cmd = train_cmd(args, name, condition, method, seed, extra)
    flags = cmd[cmd.index("train") + 1 :]
    ran, plain = _resolved(flags), _resolved(["--seed", "3"])
    assert (ran.method, ran.bank) == (plain.method, plain.bank)


def test_a_lower_bank_guidance_is_the_default_with_a_bank_of_its_own():
    from bench_convergence import bank_flags

    for g in (1.0, 4.0):
        flags = CANDIDATES[f"default-bankcfg{g:g}"]
        ran, default = _resolved(flags), _resolved([])
        assert ran.bank.bank_guidance_scale == g and default.bank.bank_guidance_scale == 7.5
        assert ran.method == default.method  # only the bank differs
        assert bank_flags(flags) == ("--bank_guidance_scale", f"{g:g}")  # prepared as a bank of its own


def test_search_tables_bound_the_speed_up_when_vanilla_never_got_there():
    """Vanilla not converged by the budget: the candidate's speed-up is the lower bound budget / its steps, and no
    AUCC ratio is made against vanilla's ~0 area; a seed where both got there gives a plain ratio."""
    from bench_convergence import search_tables

    def run(event, aucc, p_end=0.8):
        return {
            "budget": {"0.25": event, "event": event, "0.5": event, "aucc": aucc, "p_end": p_end},
            "retention": None,
        }

    rows = {
        "depth-vanilla-s0": run(None, 0.002, 0.0),
        "depth-vanilla-s1": run(400, 0.2),
        "depth-default-s0": run(200, 0.45),
        "depth-default-s1": run(200, 0.5),
    }
    text = search_tables(rows, budget=600)
    line = next(x for x in text.splitlines() if x.startswith("| depth | default |") and "x on" in x)
    event_cell = line.split(" | ")[3]
    assert (
        event_cell.startswith("2.00 (1 without a ratio)")
        and ">= 3.00x on 1 (vanilla not by 600)" in event_cell
    )
    aucc_cell = line.split(" | ")[5]
    assert (
        aucc_cell.startswith("2.50 (1 without a ratio)")
        and "1 with vanilla AUCC < 0.01: no ratio" in aucc_cell
    )


def test_the_rule_picks_the_best_area_among_those_that_keep_the_base():
    from bench_convergence import rule_table

    def run(event, aucc, p_end, single):
        budget = {"0.25": event, "event": event, "0.5": event, "aucc": aucc, "p_end": p_end}
        return {"budget": budget, "retention": None if single is None else {"single_correct": single}}

    rows = {}
    for cond in ("depth", "canny"):
        rows[f"{cond}-vanilla-s0"] = run(None, 0.01, 0.0, 1.0)
        rows[f"{cond}-fast-s0"] = run(150, 0.6, 0.9, 0.5)  # the most area, but forgets the base
        rows[f"{cond}-kept-s0"] = run(200, 0.5, 0.85, 0.95)  # keeps it
        rows[f"{cond}-late-s0"] = run(250, 0.55, 0.2, 0.95)  # keeps it; on canny it ends below vanilla (next)
    rows["canny-late-s0"] = run(250, 0.55, -0.2, 0.95)  # ends 0.2 below vanilla on canny: out
    text = rule_table(rows, budget=600, base_single=1.0)
    assert "| fast | 0.600 | 0.50 |" in text and "| kept | 0.500 | 0.95 | +0.85 | yes | yes |" in text
    assert "| late | 0.550 | 0.95 | -0.20 | yes | no |" in text
    assert "Winner: **kept**" in text
    # without retention scores nothing qualifies: the highest area among those sooner than vanilla everywhere
    unscored = {k: {**v, "retention": None} for k, v in rows.items()}
    assert "Winner: **fast** (mean AUCC 0.600; no candidate qualifies" in rule_table(unscored, 600, 1.0)
