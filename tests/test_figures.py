"Figures: no backend forced at import, PNG + the data they plot, titles and colour bars, 4-decimal tables."
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from uad_study.core import UADInputError
from uad_study.figures import (MAP_COLUMNS, PANEL_COLUMNS, FigurePath, panels_figure, plot_panels, plot_pr_curves,
                               plot_training_curves, round_table, save_figure, training_curves_figure)

ROOT = Path(__file__).resolve().parents[1]

# Import the module in a fresh interpreter and report the backend setting before and after. `rcParams._get`
# reads the raw value without resolving it (`get_backend()` would resolve and so pick a backend itself).
PROBE = r"""
import json, sys, matplotlib
if len(sys.argv) > 1: matplotlib.use(sys.argv[1])
before = str(matplotlib.rcParams._get("backend"))
import uad_study.figures as F
import numpy as np
after_import = str(matplotlib.rcParams._get("backend"))
if len(sys.argv) > 2: F.plot_panels([{c: np.ones((4, 4)) for c in F.PANEL_COLUMNS}], sys.argv[2])
after_plot = str(matplotlib.rcParams._get("backend"))
print(json.dumps({"before": before, "after_import": after_import, "after_plot": after_plot,
                  "pyplot": "matplotlib.pyplot" in sys.modules}))
"""


def _probe(*args):
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    out = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, env=env, cwd=ROOT, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_leaves_the_backend_unset():
    "With MPLBACKEND unset (a notebook kernel sets its own later), importing the module selects no backend."
    r = _probe()
    assert r["before"] == r["after_import"] == r["after_plot"], r
    assert not r["pyplot"]


@pytest.mark.parametrize("backend", ["svg", "pdf"])
def test_import_and_plotting_keep_the_callers_backend(backend, tmp_path):
    "A backend chosen by the caller (as a notebook's inline backend is) survives import and plotting; PNGs are still written."
    r = _probe(backend, str(tmp_path / "p.png"))
    assert r["before"] == r["after_import"] == r["after_plot"] == backend, r
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "p.npz").exists()


def test_no_library_module_calls_matplotlib_use():
    "No module of the package forces a backend (study_trivae is being rewritten by the lead: issue 10)."
    pending = {"study_trivae.py"}
    hits = [p.name for p in (ROOT / "uad_study").rglob("*.py")
            if p.name not in pending and re.search(r"matplotlib\.use\(", p.read_text())]
    assert hits == []


def _rows(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [{c: rng.random((8, 6)) for c in PANEL_COLUMNS} | {"title": f"s{i} z=3"} for i in range(n)]


def test_panels_title_colour_bars_and_data(tmp_path):
    rows = _rows()
    title = "vae: post-processing trivae, threshold test_best (0.1234)"
    fig, data = panels_figure(rows, title)
    assert fig.get_suptitle() == title
    main = fig.axes[: len(rows) * len(PANEL_COLUMNS)]
    has_bar = [ax.images[0].colorbar is not None for ax in main]
    assert has_bar == [c in MAP_COLUMNS for c in PANEL_COLUMNS] * len(rows)
    assert len(fig.axes) == len(main) + len(rows) * len(MAP_COLUMNS)    # the colour bars' own axes
    # each map column has its own colour limit: its maximum over the rows
    res_max = max(r["residual"].max() for r in rows)
    assert main[2].images[0].get_clim()[1] == pytest.approx(res_max, rel=1e-6)
    assert panels_figure(rows, vmax_map=2.0)[0].axes[3].images[0].get_clim()[1] == 2.0
    p = plot_panels(rows, tmp_path / "ex.png", title=title)
    assert isinstance(p, Path) and p == tmp_path / "ex.png" and p.read_bytes()[:4] == b"\x89PNG"
    saved = np.load(tmp_path / "ex.npz")
    assert len(saved.files) == 10
    np.testing.assert_array_equal(saved["row1_post_processed"], rows[1]["post-processed"].astype(np.float32))
    with pytest.raises(UADInputError, match="at least one row"): plot_panels([], tmp_path / "none.png")


def test_training_curves_every_part_kl_on_its_own_axes(tmp_path):
    nan = float("nan")
    hist = {"vae": [{"epoch": 1, "train_loss": 2.0, "train_recon": 1.5, "train_kl": 0.5, "val_loss": nan, "seconds": 3.0, "lr": 1e-3},
                    {"epoch": 2, "train_loss": 1.0, "train_recon": 0.9, "train_kl": 0.1, "val_loss": 1.2, "seconds": 3.0, "lr": 1e-3}],
            "gan": pd.DataFrame({"epoch": [1, 2], "train_g": [0.7, -0.2], "train_d": [0.6, 0.5], "val_loss": [1.0, 0.8]})}
    title = "trivae smoke: phantom T2 128x128"
    fig, data = training_curves_figure(hist, title)
    assert fig.get_suptitle() == title
    assert [ax.get_title() for ax in fig.axes] == ["vae: loss parts", "vae: KL", "gan: loss parts", "gan: KL"]
    labels = [[ln.get_label() for ln in ax.get_lines()] for ax in fig.axes]
    assert labels == [["train_loss", "train_recon", "val_loss"], ["train_kl"], ["train_g", "train_d", "val_loss"], []]
    # log scale where every value is positive; linear when a part is negative (an adversarial term)
    assert [ax.get_yscale() for ax in fig.axes] == ["log", "log", "linear", "linear"]
    # the CSV is exactly what is plotted: no seconds/lr, no NaN validation point
    p = plot_training_curves(hist, tmp_path / "curves.png", title)
    assert p == tmp_path / "curves.png" and p.exists()
    csv = pd.read_csv(tmp_path / "curves.csv")
    assert list(csv.columns) == ["model", "epoch", "part", "value"]
    assert set(csv["part"]) == {"train_loss", "train_recon", "train_kl", "val_loss", "train_g", "train_d"}
    assert csv.query("model == 'vae' and part == 'val_loss'")[["epoch", "value"]].values.tolist() == [[2, 1.2]]
    assert len(csv) == sum(len(ln.get_xdata()) for ax in fig.axes for ln in ax.get_lines())
    # without any KL part there is one column of axes
    assert len(training_curves_figure({"ae": [{"epoch": 1, "train_loss": 1.0}]})[0].axes) == 1
    with pytest.raises(UADInputError, match="no epoch"): plot_training_curves({"ae": []}, tmp_path / "x.png")


def test_pr_curves_and_save_figure(tmp_path):
    c = {"ae, none": {"recall": np.linspace(1, 0, 50), "precision": np.linspace(0.1, 1, 50), "auprc": 0.51234}}
    p = plot_pr_curves(c, 0.05, tmp_path / "pr.png", title="quickstart smoke")
    assert isinstance(p, FigurePath) and p._repr_png_()[:4] == b"\x89PNG"
    assert pd.read_csv(tmp_path / "pr.csv")["prevalence"].eq(0.05).all()
    # a pyplot figure (older chapter code) is closed after saving
    plt = pytest.importorskip("matplotlib.pyplot")
    fig, ax = plt.subplots(); ax.plot([0, 1])
    save_figure(fig, tmp_path / "old.png")
    assert not plt.fignum_exists(fig.number) and (tmp_path / "old.png").exists()


def test_round_table_four_decimals():
    df = pd.DataFrame({"model": ["ae", "vae"], "auroc": [0.94128765432101234, 0.3], "auprc": [1 / 3, np.nan],
                       "n_voxels": [1200, 35], "f32": np.array([0.123456, 2.0], np.float32)})
    out = round_table(df)
    assert out.to_csv(index=False).splitlines() == ["model,auroc,auprc,n_voxels,f32", "ae,0.9413,0.3333,1200,0.1235", "vae,0.3,,35,2.0"]
    assert "0.94128" not in out.to_string() and out["n_voxels"].dtype == df["n_voxels"].dtype
    assert df["auroc"].iloc[0] == 0.94128765432101234            # the input is not changed
    assert round_table(df, 2)["auroc"].tolist() == [0.94, 0.3]
