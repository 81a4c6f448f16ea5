"""eval's plots, read off the matplotlib objects (Agg): ppl_vs_lambda.png zooms on the optima and marks each system's
tuned λ; training.png gives each quantity one colour (train solid, validation dashed) and marks the chosen step."""

import json

import matplotlib
import pytest

matplotlib.use("Agg")

from mlpmem.components.report import lambda_figure, plot_lambda, plot_training, training_figure  # noqa: E402

LAMS = [0.0, 0.1, 0.25, 0.5, 1.0]


def _curve(base: float, best: float, at: float) -> list[float]:
    """A PPL curve over LAMS: base at 0, its minimum near ``at``, a blow-up at λ = 1."""
    return [base if x == 0 else (best + 40 * (x - at) ** 2 if x < 1 else 500.0) for x in LAMS]


def _results() -> dict:
    sweeps, splits = {}, {}
    for split, base in (("validation", 20.0), ("test", 21.0)):
        knn_T2 = _curve(base, base - 1.0, 0.1)
        sweeps[split] = {
            "base": [{"ppl": base}],
            "knn": [{"lam": x, "T": 2.0, "ppl": p} for x, p in zip(LAMS, knn_T2)] +
                   [{"lam": x, "T": 8.0, "ppl": p + 3} for x, p in zip(LAMS, knn_T2)],  # not the tuned T
            "memory": [{"lam": x, "T_mem": 1.0, "ppl": p} for x, p in zip(LAMS, _curve(base, base - 2.0, 0.25))]
                      + [{"lam": 1.0, "T_mem": 0.5, "ppl": None}],  # strict JSON's infinite PPL
            "memory+knn": [{"lam_mem": a, "lam_knn": b, "T": 2.0, "T_mem": 1.0, "ppl": base - 2.2 + (a + b - 0.35) ** 2}
                           for a in LAMS[1:] for b in LAMS[1:] if a + b <= 1],
        }
        splits[split] = {"systems": {"base": {"ppl": base}, "knn": {"lam": 0.1, "T": 2.0, "ppl": base - 1.0},
                                     "memory": {"lam": 0.27, "T_mem": 1.0, "ppl": base - 2.01},
                                     "memory+knn": {"ppl": base - 2.2},
                                     "memory+gate": {"ppl": base - 2.4}}}
    settings = {"base": {}, "knn": {"lam": 0.1, "T": 2.0}, "memory": {"lam": 0.27, "T_mem": 1.0},
                "memory alone": {"lam": 1.0, "T_mem": 1.0},
                "memory+knn": {"lam_mem": 0.25, "lam_knn": 0.1, "T": 2.0, "T_mem": 1.0},
                "memory+gate": {"lam": 0.27, "T_mem": 1.0, "gate": {"lam0": 0.27}}}
    return {"tuned_on": "validation", "settings": settings, "sweeps": sweeps, "splits": splits}


def _lines(ax):
    return [ln for ln in ax.get_lines() if not ln.get_label().startswith("_")]


def test_lambda_plot_zooms_on_the_optima_and_marks_each_tuned_lambda(tmp_path):
    import matplotlib.pyplot as plt

    results = _results()
    fig = lambda_figure(results)
    axes = fig.get_axes()
    assert [ax.get_title().split()[0] for ax in axes] == ["validation", "test"]
    for ax, split in zip(axes, ("validation", "test")):
        base = results["sweeps"][split]["base"][0]["ppl"]
        tuned = results["splits"][split]["systems"]
        lo, hi = ax.get_ylim()
        # every optimum and the base LM inside, a few % above base at most; λ = 1's blow-up (500) far outside
        assert lo < min(s["ppl"] for s in tuned.values()) and hi >= base
        assert hi <= base * 1.1 < 500
        by_label = {ln.get_label(): ln for ln in _lines(ax)}
        # each system's tuned λ: a star (a diamond for the gate) at (λ, the split's PPL there) and a vertical line
        for name, system, lam, marker in (("+ kNN-LM", "knn", 0.1, "*"), ("+ MLP memory", "memory", 0.27, "*"),
                                          ("+ memory + kNN-LM", "memory+knn", 0.35, "*"),
                                          ("+ memory, gated", "memory+gate", 0.27, "D")):
            mark = [ln for lbl, ln in by_label.items() if lbl.startswith(f"{name} tuned")]
            assert len(mark) == 1, (name, list(by_label))
            assert list(mark[0].get_xdata()) == pytest.approx([lam]) and mark[0].get_marker() == marker
            assert list(mark[0].get_ydata()) == [tuned[system]["ppl"]]
            assert f"{lam:.2f}" in mark[0].get_label()
            vlines = [ln for ln in ax.get_lines() if list(ln.get_xdata()) == pytest.approx([lam, lam])
                      and ln.get_color() == mark[0].get_color()]
            assert vlines, name
        # the curves: kNN-LM at its tuned T only, the memory's null PPL dropped, memory+kNN over the total λ
        knn = next(ln for lbl, ln in by_label.items() if lbl.startswith("+ kNN-LM (T=2)"))
        assert list(knn.get_ydata()) == [r["ppl"] for r in results["sweeps"][split]["knn"] if r["T"] == 2.0]
        mem = next(ln for lbl, ln in by_label.items() if lbl.startswith("+ MLP memory (T_mem=1)"))
        assert len(mem.get_xdata()) == len(LAMS)
        both = next(ln for lbl, ln in by_label.items() if lbl.startswith("+ memory + kNN-LM (best split"))
        assert min(both.get_ydata()) == pytest.approx(base - 2.2)
        # one colour per system, the same in both panels
        assert len({ln.get_color() for ln in (knn, mem, both)}) == 3
        assert ax.get_xlim()[1] <= 1.02
    plt.close(fig)
    plot_lambda(results, tmp_path / "ppl_vs_lambda.png")
    assert (tmp_path / "ppl_vs_lambda.png").stat().st_size > 0


def test_lambda_plot_of_a_base_only_run():
    import matplotlib.pyplot as plt

    fig = lambda_figure({"settings": {"base": {}}, "sweeps": {"test": {"base": [{"ppl": 10.0}]}},
                         "splits": {"test": {"systems": {"base": {"ppl": 10.0}}}}})
    lo, hi = fig.get_axes()[0].get_ylim()
    assert lo < 10.0 < hi <= 10.5
    plt.close(fig)


def _metrics() -> list[dict]:
    train = [{"step": s, "loss": 4 - s / 10, "kl": 3 - s / 10, "ce": 5 - s / 10} for s in range(2, 13, 2)]
    val = [{"step": s, "split": "validation", "loss": v, "kl": v - 1, "ce": v + 1}
           for s, v in ((4, 3.5), (8, 3.2), (12, 3.3))]
    return train + val


def test_training_plot_colours_quantities_dashes_validation_and_marks_the_chosen_step(tmp_path):
    import matplotlib.pyplot as plt

    fig = training_figure(_metrics(), {"step": 8, "select_by": "loss"})
    ax = fig.get_axes()[0]
    lines = {ln.get_label(): ln for ln in _lines(ax)}
    colours = set()
    for q in ("loss", "kl", "ce"):
        tr, va = lines[f"train {q}"], lines[f"validation {q}"]
        assert tr.get_color() == va.get_color() and tr.get_linestyle() == "-" and va.get_linestyle() == "--"
        colours.add(tr.get_color())
    assert len(colours) == 3
    chosen = next(ln for lbl, ln in lines.items() if lbl.startswith("chosen: step 8"))
    assert list(chosen.get_xdata()) == [8] and list(chosen.get_ydata()) == [3.2]
    assert chosen.get_color() == lines["validation loss"].get_color()
    assert any(list(ln.get_xdata()) == [8, 8] for ln in ax.get_lines())  # the vertical line
    plt.close(fig)
    assert training_figure([{"step": 1, "split": "validation", "loss": 1.0}]) is None  # nothing trained yet

    # from files: best.json names the chosen step (select_by ce here), else the lowest validation loss
    mem = tmp_path / "memory"
    mem.mkdir()
    (mem / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in _metrics()) + "\n{cut short")
    assert plot_training(mem / "metrics.jsonl", tmp_path / "a.png") and (tmp_path / "a.png").stat().st_size > 0
    (mem / "best.json").write_text(json.dumps({"step": 12, "val_loss": 3.3, "select_by": "ce", "value": 4.3}))
    from mlpmem.components.report import chosen_checkpoint, read_metrics

    assert chosen_checkpoint(mem / "metrics.jsonl", read_metrics(mem / "metrics.jsonl")) == \
        {"step": 12, "select_by": "ce"}
    (mem / "best.json").unlink()
    assert chosen_checkpoint(mem / "metrics.jsonl", read_metrics(mem / "metrics.jsonl")) == \
        {"step": 8, "select_by": "loss"}
    assert not plot_training(mem / "missing.jsonl", tmp_path / "b.png")
