"""MixStyle: what it does to a batch's statistics, that it is training-only, and a run that uses it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cells import TINY_TRAIN
from leuko.errors import LeukoError
from leuko.models import build_model
from leuko.run.folder import read_model_file
from leuko.train import train
from leuko.train.mixstyle import MixStyle, attach_mixstyle, style_stages


def _styled_batch() -> torch.Tensor:
    """Four maps with very different channel means and spreads (four 'labs'), the same pattern inside."""
    torch.manual_seed(0)
    pattern = torch.randn(1, 3, 8, 8)
    scale = torch.tensor([0.5, 1.0, 2.0, 4.0]).view(4, 1, 1, 1)
    shift = torch.tensor([-3.0, 0.0, 3.0, 6.0]).view(4, 1, 1, 1)
    return pattern * scale + shift


def test_mixstyle_moves_each_cells_statistics_between_its_own_and_a_partners() -> None:
    x = _styled_batch()
    mix = MixStyle(p=1.0, alpha=0.3)
    torch.manual_seed(1)
    y = mix.train()(x)
    mu_x, mu_y = x.mean(dim=(2, 3)), y.mean(dim=(2, 3))
    assert not torch.allclose(mu_x, mu_y)  # the style changed
    assert float(mu_y.min()) >= float(mu_x.min()) - 1e-4 and float(mu_y.max()) <= float(mu_x.max()) + 1e-4  # a convex mix
    # the content (each map normalised per channel) is untouched
    def norm(t: torch.Tensor) -> torch.Tensor:
        return (t - t.mean(dim=(2, 3), keepdim=True)) / t.std(dim=(2, 3), keepdim=True)
    torch.testing.assert_close(norm(y), norm(x), atol=1e-3, rtol=1e-3)
    assert torch.equal(mix.eval()(x), x)  # eval mode: identity
    assert torch.equal(MixStyle(p=0.0).train()(x), x)
    with pytest.raises(LeukoError, match="feature maps"):
        MixStyle(p=1.0).train()(torch.randn(4, 10))


def test_mixstyle_hooks_leave_the_network_and_its_state_dict_as_they_were() -> None:
    model = build_model("efficientnet_lite0", 5, pretrained="none")
    keys = list(model.state_dict())
    stages = style_stages(model)
    assert len(stages) == 7  # EfficientNet-Lite0's blocks
    mix, handles = attach_mixstyle(model, 1.0, 0.1, 3)
    assert list(model.state_dict()) == keys and len(handles) == 3
    x = torch.randn(4, 3, 64, 64)
    model.eval()
    mix.eval()
    with torch.no_grad():
        plain_eval = model(x)
        mix.train()  # the module's mode decides, as when it is a submodule of the training module
        torch.manual_seed(2)
        mixed = model(x)
    assert not torch.allclose(plain_eval, mixed, atol=1e-4)
    for h in handles:
        h.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain_eval)
    with pytest.raises(LeukoError, match="mix after 1 to 6"):
        attach_mixstyle(model, 0.5, 0.1, 7)
    with pytest.raises(LeukoError, match="needs a backbone with stages"):
        attach_mixstyle(torch.nn.Sequential(torch.nn.Linear(3, 3)), 0.5, 0.1, 1)


def test_a_run_with_mixstyle_trains_and_saves_the_plain_network(tiny_data: Path, tmp_path: Path) -> None:
    out = tmp_path / "mix"
    res = train(None, out, overrides=[*TINY_TRAIN, "train.mixstyle=1.0", "train.mixstyle_stages=2"],
                data_path=tiny_data, echo=lambda s: None)
    assert res.epochs_run == 2
    _, state = read_model_file(out / "model.pt")
    assert set(state) == set(build_model("custom_cnn", 3, pretrained="none").state_dict())  # nothing of MixStyle saved
    with pytest.raises(LeukoError, match="mixstyle_stages=3"):
        train(None, tmp_path / "bad", overrides=[*TINY_TRAIN, "train.mixstyle=0.5", "train.mixstyle_stages=3"],
              data_path=tiny_data, echo=lambda s: None)
