"""The task-batched runner of any traceable model (fastmeta.algorithms._batched) and fastmeta.models.ResNet12."""

import pytest
import torch
from torch import nn

from fastmeta.models import DropBlock, ResNet12, from_config

D64 = torch.float64


def test_resnet12_shapes_and_config():
    model = ResNet12(5, widths=(4, 6, 8, 10), image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
    assert model.embedding_size == 10
    assert all(not m.track_running_stats for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 16  # 4 x (3 + shortcut)
    rebuilt = from_config(model.config)
    assert rebuilt.config == model.config
    rebuilt.load_state_dict(model.state_dict())  # the same parameter names and shapes
    embedding = ResNet12(None, in_channels=1, widths=(4, 6, 8, 10), image_size=28)
    assert embedding(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    assert isinstance(embedding.head, nn.Identity)
    default = ResNet12()
    assert [b.conv1.out_channels for b in list(default.features)[:4]] == [64, 160, 320, 640]
    assert default.embedding_size == 640
    with pytest.raises(ValueError, match="image_size"):
        ResNet12(image_size=8)
    with pytest.raises(ValueError, match="widths"):
        ResNet12(widths=(4, 6))


def test_dropblock():
    x = torch.ones(64, 4, 10, 10, dtype=D64)
    drop = DropBlock(0.2, 3)
    y = drop(x)
    assert 0.1 < (y == 0).double().mean() < 0.3
    assert_mean = y.sum((1, 2, 3)) / x[0].numel()
    torch.testing.assert_close(assert_mean, torch.ones_like(assert_mean))  # each example rescaled on its own
    assert torch.equal(drop.eval()(x), x)
    model = ResNet12(5, widths=(4, 6, 8, 10), image_size=32, drop_rate=0.1)
    assert sum(isinstance(m, DropBlock) for m in model.modules()) == 2
    assert sum(isinstance(m, nn.Dropout) for m in model.modules()) == 2
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 5)
