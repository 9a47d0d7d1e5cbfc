import pytest
import torch

from gazeguard.errors import ConfigError
from gazeguard.model import GazeRegressor


def test_head_of_features_equals_forward():
    model = GazeRegressor().eval()
    x = torch.rand(3, 3, 32, 32)
    features = model.features(x)
    assert features.shape == (3, model.backbone.num_features)
    assert torch.allclose(model.head(features), model(x))
    assert model(x).shape == (3, 2)


def test_unknown_backbone_is_a_clear_error():
    with pytest.raises(ConfigError, match="model.backbone: unknown timm model 'resnet_nonexistent'"):
        GazeRegressor(backbone="resnet_nonexistent")


def test_hyperparameters_are_saved():
    model = GazeRegressor(lr=1e-2, kind="point")
    assert model.hparams.lr == 1e-2 and model.hparams.kind == "point" and model.unit == "cm"
