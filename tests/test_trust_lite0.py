"""The trust score on the real EfficientNet-Lite0: plain pixel-space images, which reach their
units the adversarial way, score clearly below the fourier recipe's on the same units."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from atlas.cli import cli
from atlas.store import Store

pytestmark = pytest.mark.integration
pytest.importorskip("skimage")

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("trust") / "photos"
    script = ROOT / "bench" / "demo_photos.py"
    subprocess.run([sys.executable, script, folder, "--count", "96", "--seed", "1"], check=True)
    return folder


def scores(out: Path, photos: Path, recipe: str) -> dict[str, float]:
    args = ["run", "efficientnet_lite0", "--layers", "blocks.8", "--channels", "0-7"]
    args += ["--classes", "", "--steps", "64", "--recipe", recipe, "--scheduler", "inline"]
    result = CliRunner().invoke(cli, [*args, "--exemplars", str(photos), "--out", str(out)])
    assert result.exit_code == 0, result.output
    units, _ = Store(out).classify()
    return {unit.id: unit.trust["score"] for unit in units if unit.trust}


def test_plain_images_score_clearly_below_fourier_ones(tmp_path, photos):
    plain = scores(tmp_path / "plain", photos, "plain")
    fourier = scores(tmp_path / "fourier", photos, "fourier")
    assert set(plain) == set(fourier) and len(plain) == 8
    pairs = np.array([(plain[unit], fourier[unit]) for unit in plain])
    assert pairs[:, 0].mean() + 0.1 < pairs[:, 1].mean()
    assert (pairs[:, 1] > pairs[:, 0]).sum() >= 6  # on most units, not only on average
