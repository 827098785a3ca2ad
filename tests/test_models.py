"""The model zoo: the registry, every model's forward and backward pass, parameter counts."""
import inspect

import pytest
import torch
import torchvision
from torch import nn

from sparsecomm import models

CIFAR = ["resnet18", "resnet152", "resnet20", "vgg16", "vgg19", "senet18", "googlenet"]
ALL = set(CIFAR) | {"mnist_cnn", "lstm_lm", "neumf", "logreg"}


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def neumf_count(users: int, items: int, factors: int, mlp: tuple[int, ...]) -> int:
    """NeuMF's parameters: four embeddings, the MLP's Linear layers, the final Linear."""
    embeddings = (users + items) * (factors + mlp[0] // 2)
    hidden = sum((a + 1) * b for a, b in zip(mlp[:-1], mlp[1:]))
    return embeddings + hidden + (factors + mlp[-1]) + 1


# name -> (options, inputs for forward, expected output shape)
def example(name: str, num_classes: int = 10):
    g = torch.Generator().manual_seed(0)
    if name in CIFAR:
        return {"num_classes": num_classes}, (torch.randn(2, 3, 32, 32, generator=g),), (2, num_classes)
    if name == "mnist_cnn":
        return {"num_classes": num_classes}, (torch.randn(2, 1, 28, 28, generator=g),), (2, num_classes)
    if name == "lstm_lm":
        opts = {"vocab_size": 50, "emsize": 16, "nhid": 16, "nlayers": 2}
        return opts, (torch.randint(0, 50, (5, 2), generator=g),), (5, 2, 50)
    if name == "neumf":
        opts = {"num_users": 7, "num_items": 11, "factors": 4, "mlp_layers": (8, 8, 4)}
        return opts, (torch.tensor([0, 6]), torch.tensor([10, 3])), (2,)
    if name == "logreg":
        return {"num_features": 12, "num_classes": num_classes}, (torch.randn(2, 12, generator=g),), \
            (2,) if num_classes == 2 else (2, num_classes)
    raise AssertionError(f"no example input for model {name!r}; add one")


def test_available_lists_every_model():
    assert set(models.available_models()) == ALL
    assert models.available_models() == sorted(models.available_models())


@pytest.mark.parametrize("name", sorted(ALL))
def test_forward_and_backward_reach_every_parameter(name):
    torch.manual_seed(0)
    options, inputs, shape = example(name)
    model = models.build_model(name, **options)
    out = model(*inputs)
    logits = out[0] if name == "lstm_lm" else out
    assert logits.shape == shape
    assert torch.isfinite(logits).all()
    logits.float().square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without a gradient: {missing}"
    model.eval()
    with torch.no_grad():
        again = model(*inputs)
    assert (again[0] if name == "lstm_lm" else again).shape == shape


@pytest.mark.parametrize("name", CIFAR + ["mnist_cnn"])
def test_num_classes_sets_the_output_width(name):
    options, inputs, shape = example(name, num_classes=100)
    model = models.build_model(name, **options).eval()
    with torch.no_grad():
        assert model(*inputs).shape == shape


@pytest.mark.parametrize("name,classes,expected", [
    ("resnet18", 10, 11_173_962), ("resnet18", 100, 11_220_132),
    ("resnet20", 10, 269_722), ("resnet20", 100, 275_572),
    ("resnet152", 10, 58_156_618), ("resnet152", 100, 58_341_028),
    ("vgg16", 10, 14_728_266), ("vgg16", 100, 14_774_436),
    ("vgg19", 10, 20_040_522), ("vgg19", 100, 20_086_692),
    ("senet18", 10, 11_260_354), ("senet18", 100, 11_306_524),
    ("googlenet", 10, 6_166_250), ("googlenet", 100, 6_258_500),
    ("mnist_cnn", 10, 1_199_882),
])
def test_parameter_counts(name, classes, expected):
    with torch.device("meta"):
        model = models.build_model(name, num_classes=classes)
    assert count(model) == expected


def test_resnet18_has_62_parameter_tensors():
    with torch.device("meta"):
        model = models.build_model("resnet18")
    assert len(list(model.parameters())) == 62


@pytest.mark.parametrize("name,reference", [("resnet18", "resnet18"), ("resnet152", "resnet152")])
def test_cifar_resnet_equals_torchvision_with_a_3x3_stem(name, reference):
    """Same parameter names, shapes and order as torchvision's ResNet with the stem replaced."""
    with torch.device("meta"):
        ours = models.build_model(name, num_classes=10)
        theirs = getattr(torchvision.models, reference)(num_classes=10)
        theirs.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
    theirs.maxpool = nn.Identity()
    assert [(n, p.shape) for n, p in ours.named_parameters()] == [(n, p.shape) for n, p in theirs.named_parameters()]
    assert [(n, b.shape) for n, b in ours.named_buffers()] == [(n, b.shape) for n, b in theirs.named_buffers()]


def test_resnet20_shortcuts_hold_no_parameters():
    model = models.build_model("resnet20")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 19  # stem + 3 stages x 3 blocks x 2: no projection convolutions
    assert all(m.kernel_size == (3, 3) for m in convs)


def test_lstm_lm_wikitext2_size_and_tied_weight_counted_once():
    with torch.device("meta"):
        model = models.build_model("lstm_lm", vocab_size=28_869)
    assert count(model) == 28_949_319
    assert model.decoder.weight is model.encoder.weight
    assert sum(p is model.encoder.weight for p in model.parameters()) == 1
    assert len(list(model.parameters())) == 14  # embedding, 3 x 4 LSTM tensors, decoder bias


def test_lstm_lm_untied_ptb_size():
    model = models.build_model("lstm_lm", vocab_size=10_000, emsize=200, nhid=200, nlayers=2, dropout=0.0,
                               tie_weights=False)
    assert model.decoder.weight is not model.encoder.weight
    assert count(model) == 2 * 10_000 * 200 + 2 * (4 * 200 * 400 + 8 * 200) + 10_000
    assert model.encoder.weight.abs().max() <= 0.1 and model.decoder.weight.abs().max() <= 0.1
    assert torch.all(model.decoder.bias == 0)


def test_lstm_lm_hidden_state():
    model = models.build_model("lstm_lm", vocab_size=30, emsize=8, nhid=8, nlayers=2, dropout=0.0).double()
    h, c = model.init_hidden(3)
    assert h.shape == c.shape == (2, 3, 8) and h.dtype == torch.float64 and not h.any() and not c.any()
    tokens = torch.randint(0, 30, (4, 3))
    logits, hidden = model(tokens, (h, c))
    assert logits.shape == (4, 3, 30) and logits.dtype == torch.float64
    assert hidden[0].requires_grad
    detached = models.lstm.LSTMLanguageModel.detach_hidden(hidden)
    assert isinstance(detached, tuple) and not any(t.requires_grad for t in detached)
    assert all(torch.equal(a, b) for a, b in zip(detached, hidden))
    # Carrying the state over equals running the two halves as one sequence.
    whole, _ = model(tokens)
    first, state = model(tokens[:2])
    second, _ = model(tokens[2:], model.detach_hidden(state))
    torch.testing.assert_close(torch.cat([first, second]), whole)


def test_lstm_lm_tied_weights_need_equal_sizes():
    with pytest.raises(ValueError, match=r"tie_weights needs emsize == nhid, got emsize=100, nhid=200"):
        models.build_model("lstm_lm", vocab_size=50, emsize=100, nhid=200)
    models.build_model("lstm_lm", vocab_size=50, emsize=100, nhid=200, tie_weights=False)


def test_lstm_lm_single_layer_takes_dropout_without_warning(recwarn):
    models.build_model("lstm_lm", vocab_size=20, emsize=8, nhid=8, nlayers=1, dropout=0.4)
    assert not [w for w in recwarn if "dropout" in str(w.message)]


@pytest.mark.parametrize("users,items,factors,mlp", [
    (7, 11, 4, (8, 8, 4)), (5, 3, 8, (16,)), (10, 20, 64, (256, 256, 128, 64)),
])
def test_neumf_parameter_count_formula(users, items, factors, mlp):
    model = models.build_model("neumf", num_users=users, num_items=items, factors=factors, mlp_layers=mlp)
    assert count(model) == neumf_count(users, items, factors, mlp)


def test_neumf_movielens20m_size():
    with torch.device("meta"):
        model = models.build_model("neumf", num_users=138_493, num_items=26_744)
    assert count(model) == neumf_count(138_493, 26_744, 64, (256, 256, 128, 64)) == 31_832_577


def test_neumf_scores_pairs_independently():
    model = models.build_model("neumf", num_users=9, num_items=13, factors=4, mlp_layers=(8, 4)).eval()
    users, items = torch.tensor([1, 8, 3]), torch.tensor([12, 0, 5])
    with torch.no_grad():
        together = model(users, items)
        alone = torch.stack([model(users[i:i + 1], items[i:i + 1])[0] for i in range(3)])
    torch.testing.assert_close(together, alone)
    assert model.gmf_user.weight.std() < 0.05  # normal(0, 0.01)


def test_neumf_first_mlp_size_must_be_even():
    with pytest.raises(ValueError, match=r"mlp_layers must be non-empty with an even first size, got \(9, 4\)"):
        models.build_model("neumf", num_users=3, num_items=3, mlp_layers=(9, 4))


@pytest.mark.parametrize("classes,width", [(2, 1), (3, 3), (10, 10)])
def test_logreg_outputs(classes, width):
    model = models.build_model("logreg", num_features=5, num_classes=classes)
    assert count(model) == 5 * width + width
    assert not any(p.any() for p in model.parameters())


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_logreg_sparse_input_equals_dense():
    torch.manual_seed(0)
    model = models.build_model("logreg", num_features=6, num_classes=4)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()
    x = torch.randn(3, 6) * (torch.rand(3, 6) < 0.4)
    dense = model(x)
    torch.testing.assert_close(model(x.to_sparse()), dense)
    torch.testing.assert_close(model(x.to_sparse_csr()), dense)
    model(x.to_sparse()).sum().backward()
    assert model.linear.weight.grad is not None


def test_logreg_binary_pairs_with_bce():
    model = models.build_model("logreg", num_features=4)
    loss = nn.BCEWithLogitsLoss()(model(torch.randn(8, 4)), torch.randint(0, 2, (8,)).float())
    assert loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))))  # zero start: p = 1/2


def test_unknown_name_lists_the_available_ones():
    with pytest.raises(ValueError, match=r"unknown model 'resnet19'; available: googlenet, .*resnet18, .*vgg19"):
        models.build_model("resnet19")


def test_unknown_option_names_it_and_the_allowed_ones():
    with pytest.raises(ValueError, match=r"unknown option 'classes' for model 'resnet18'; allowed: num_classes"):
        models.build_model("resnet18", classes=100)
    with pytest.raises(ValueError, match=r"unknown options 'hidden', 'layers' for model 'lstm_lm'; allowed: "
                                         r"vocab_size, emsize, nhid, nlayers, dropout, tie_weights"):
        models.build_model("lstm_lm", vocab_size=10, layers=2, hidden=5)


def test_missing_required_option_is_named():
    with pytest.raises(ValueError, match=r"model 'neumf' needs num_items"):
        models.build_model("neumf", num_users=10)


def test_model_options_report_defaults():
    assert models.model_options("resnet18") == {"num_classes": 10}
    opts = models.model_options("lstm_lm")
    assert opts["vocab_size"] is inspect.Parameter.empty
    assert {k: v for k, v in opts.items() if k != "vocab_size"} == {
        "emsize": 650, "nhid": 650, "nlayers": 3, "dropout": 0.4, "tie_weights": True}
    assert models.model_options("neumf")["mlp_layers"] == (256, 256, 128, 64)


@pytest.mark.parametrize("name,options,message", [
    ("resnet18", {"num_classes": 0}, r"num_classes must be a positive integer, got 0"),
    ("vgg16", {"num_classes": 2.5}, r"num_classes must be a positive integer, got 2.5"),
    ("mnist_cnn", {"num_classes": True}, r"num_classes must be a positive integer, got True"),
    ("lstm_lm", {"vocab_size": 10, "dropout": 1.0}, r"dropout must be a number in \[0, 1\), got 1.0"),
    ("neumf", {"num_users": 3, "num_items": -1}, r"num_items must be a positive integer, got -1"),
    ("logreg", {"num_features": 3, "num_classes": 1}, r"num_classes must be at least 2, got 1"),
])
def test_bad_values_are_named(name, options, message):
    with pytest.raises(ValueError, match=message):
        models.build_model(name, **options)


def test_registering_a_taken_name_is_refused():
    with pytest.raises(ValueError, match="model name 'resnet18' is already registered"):
        models.register_model("resnet18")(lambda: nn.Linear(1, 1))
