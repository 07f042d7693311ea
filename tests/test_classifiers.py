"""Classifier loading, preprocessing, class resolution and error messages, offline.

Everything is built from configs with random weights and saved to temporary files
(timm's test_resnet / test_vit, a tiny open_clip CLIP, a tiny TorchScript model),
so nothing is downloaded and the whole file runs in seconds on a CPU.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before huggingface_hub is imported: never touch the network

import json
import warnings
from pathlib import Path

import huggingface_hub.constants
import open_clip
import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from digin_cli.errors import DiginError
from digin_cli.models import classifiers
from digin_cli.models.classifiers import (
    BUILTIN_CLASSIFIER_LOADERS,
    Classifier,
    load_classifier,
    resolve_class,
    zero_shot_cache_path,
)

SHAPES = ["circle", "bar", "triangle", "star"]
TINY_CLIP = "digin-test-tiny-clip"


@pytest.fixture(autouse=True)
def isolated_caches(tmp_path, monkeypatch):
    """Our cache and the Hugging Face cache both point into tmp_path: every test starts cold."""
    monkeypatch.setenv("DIGIN_CACHE", str(tmp_path / "digin-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Random-weight checkpoints and class files shared by the module's tests."""
    folder = tmp_path_factory.mktemp("classifiers")
    torch.manual_seed(0)
    four_way = timm.create_model("test_resnet", pretrained=False, num_classes=len(SHAPES))
    save_file(four_way.state_dict(), str(folder / "resnet4.safetensors"))
    torch.save(four_way.state_dict(), folder / "resnet4.pth")
    # a training checkpoint in the legacy (non-zip) format, nested under "state_dict"
    torch.save({"state_dict": four_way.state_dict(), "epoch": 3}, folder / "resnet4-legacy.pth",
               _use_new_zipfile_serialization=False)
    imagenet = timm.create_model("test_resnet", pretrained=False)  # 1000 classes
    save_file(imagenet.state_dict(), str(folder / "resnet1k.safetensors"))
    vit = timm.create_model("test_vit", pretrained=False, num_classes=len(SHAPES))
    save_file(vit.state_dict(), str(folder / "vit4.safetensors"))
    (folder / "shapes.txt").write_text("\n".join(SHAPES) + "\n")
    (folder / "three.txt").write_text("a\nb\nc\n")
    return {
        "resnet4.safetensors": folder / "resnet4.safetensors",
        "resnet4.pth": folder / "resnet4.pth",
        "resnet4-legacy.pth": folder / "resnet4-legacy.pth",
        "resnet1k": folder / "resnet1k.safetensors",
        "vit4": folder / "vit4.safetensors",
        "shapes": folder / "shapes.txt",
        "three": folder / "three.txt",
        "folder": folder,
    }


def timm_spec(files, checkpoint="resnet4.safetensors", arch="test_resnet", classes="shapes") -> str:
    spec = f"timm:{arch},checkpoint={files[checkpoint]}"
    return spec + (f",classes={files[classes]}" if classes else "")


def reference_logits(model: torch.nn.Module, images: torch.Tensor, size, mean, std) -> torch.Tensor:
    x = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return model((x - mean) / std)


def assert_frozen_and_differentiable(classifier: Classifier, images: torch.Tensor, method=None) -> None:
    images = images.clone().requires_grad_(True)
    out = (method or classifier)(images)
    out.square().sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in classifier.parameters())
    assert not classifier.training


# --------------------------------------------------------------------------- timm


@pytest.mark.parametrize("checkpoint", ["resnet4.safetensors", "resnet4.pth", "resnet4-legacy.pth"])
def test_timm_checkpoint_loads_through_timm_with_inferred_num_classes(files, checkpoint):
    classifier = load_classifier(timm_spec(files, checkpoint))

    torch.manual_seed(0)  # the same random weights the fixture saved
    expected = timm.create_model("test_resnet", pretrained=False, num_classes=4).eval()
    images = torch.rand(2, 3, 200, 180)  # (N, 3, H, W), not the model's size on purpose
    logits = classifier(images)
    assert logits.shape == (2, 4)
    assert classifier.num_classes == 4 and classifier.class_names == SHAPES
    with torch.no_grad():
        reference = reference_logits(expected, images, (160, 160), (0.5,) * 3, (0.5,) * 3)
    torch.testing.assert_close(logits, reference)
    assert_frozen_and_differentiable(classifier, images)


def test_timm_checkpoint_trained_with_another_activation_says_so_in_the_spec(files, tmp_path):
    torch.manual_seed(1)
    leaky = timm.create_model("test_resnet", pretrained=False, num_classes=4, act_layer="leaky_relu").eval()
    save_file(leaky.state_dict(), str(tmp_path / "leaky.safetensors"))
    spec = f"timm:test_resnet,checkpoint={tmp_path / 'leaky.safetensors'},classes={files['shapes']}"
    images = torch.rand(2, 3, 160, 160)
    with torch.no_grad():
        reference = reference_logits(leaky, images, (160, 160), (0.5,) * 3, (0.5,) * 3)
    # Activations have no weights: without act_layer the same file loads into ReLUs, silently.
    torch.testing.assert_close(load_classifier(spec + ",act_layer=leaky_relu")(images), reference)
    assert not torch.allclose(load_classifier(spec)(images), reference)


def test_timm_preprocessing_comes_from_the_model_config(files):
    classifier = load_classifier(timm_spec(files, "vit4", arch="test_vit"))
    config = timm.data.resolve_model_data_config(classifier.model)
    assert classifier.input_size == tuple(config["input_size"][-2:]) == (160, 160)
    assert classifier.mean.shape == classifier.std.shape == (1, 3, 1, 1)
    assert classifier.mean.flatten().tolist() == pytest.approx(config["mean"])
    assert classifier.std.flatten().tolist() == pytest.approx(config["std"])
    # test_vit has a fixed input size: any image size must still work.
    assert classifier(torch.rand(1, 3, 64, 96)).shape == (1, 4)


def test_timm_features_are_the_input_of_the_last_linear_layer(files):
    classifier = load_classifier(timm_spec(files))
    images = torch.rand(3, 3, 160, 160)
    features = classifier.features(images)
    assert features.shape == (3, classifier.model.get_classifier().in_features)
    torch.testing.assert_close(classifier.model.get_classifier()(features), classifier(images))
    assert_frozen_and_differentiable(classifier, images, classifier.features)


def test_frozen_classifier_stays_in_eval_mode(files):
    classifier = load_classifier(timm_spec(files))
    torch.nn.Sequential(classifier).train()
    assert not classifier.training and not classifier.model.training


def test_explicit_num_classes_overrides_inference(files):
    classifier = load_classifier(timm_spec(files) + ",num_classes=4")
    assert classifier.num_classes == 4


def test_imagenet_head_gets_clean_names_and_synonyms(files):
    classifier = load_classifier(timm_spec(files, "resnet1k", classes=None))
    assert classifier.num_classes == 1000
    assert classifier.class_names[1] == "goldfish"
    assert classifier.class_names[281] == "tabby cat"
    assert resolve_class(classifier, "tabby cat") == 281
    assert resolve_class(classifier, "  Tabby   CAT ") == 281
    assert resolve_class(classifier, "tabby_cat") == 281
    assert resolve_class(classifier, "tabby") == 281  # timm's WordNet synonym
    assert resolve_class(classifier, "Carassius auratus") == 1
    assert resolve_class(classifier, "281") == 281
    # a display name wins over another class's synonym ("cardigan" is also a corgi synonym)
    assert resolve_class(classifier, "cardigan") == classifier.class_names.index("cardigan")


def test_unknown_class_lists_close_matches(files):
    classifier = load_classifier(timm_spec(files, "resnet1k", classes=None))
    classifier.spec = "timm:resnet50"  # as it would read for a real model
    with pytest.raises(DiginError) as error:
        resolve_class(classifier, "tabby katt")
    assert str(error.value) == (
        "unknown class 'tabby katt' for timm:resnet50; close matches: 'tabby cat', 'tabby' "
        "(give a class name or an index 0-999)"
    )


def test_ambiguous_class_name_asks_for_the_index(files):
    classifier = load_classifier(timm_spec(files, "resnet1k", classes=None))
    with pytest.raises(DiginError, match=r"'missile' is ambiguous .* 657 \('missile'\), 744 .* give the index"):
        resolve_class(classifier, "missile")


def test_resolve_class_on_a_classes_file(files):
    classifier = load_classifier(timm_spec(files))
    assert resolve_class(classifier, " Bar ") == 1
    assert resolve_class(classifier, "3") == 3
    with pytest.raises(DiginError, match=r"class index 4 is out of range .*; use 0-3"):
        resolve_class(classifier, "4")
    with pytest.raises(DiginError, match=r"class index -1 is out of range"):
        resolve_class(classifier, "-1")
    no_match = r"unknown class 'hexagon' .*no close matches \(give a class name or an index 0-3\)"
    with pytest.raises(DiginError, match=no_match):
        resolve_class(classifier, "hexagon")


def test_timm_without_classes_or_imagenet_head_numbers_classes(files):
    classifier = load_classifier(timm_spec(files, classes=None))
    assert classifier.class_names == ["class 0", "class 1", "class 2", "class 3"]
    assert resolve_class(classifier, "Class 2") == 2


# --------------------------------------------------------------------------- timm errors


def test_unknown_timm_model_suggests_close_names():
    expected = r"unknown timm model 'resnet5O' in 'timm:resnet5O'; close matches: .*resnet50"
    with pytest.raises(DiginError, match=expected):
        load_classifier("timm:resnet5O")


def test_unknown_timm_pretrained_tag_lists_known_tags():
    expected = r"unknown pretrained tag in 'resnet50.badtag' for timm model resnet50; known: resnet50\."
    with pytest.raises(DiginError, match=expected):
        load_classifier("timm:resnet50.badtag")


def test_timm_weights_missing_offline_say_how_to_fix():
    with pytest.raises(DiginError) as error:
        load_classifier("timm:test_resnet")
    message = str(error.value)
    assert "pretrained weights for timm model 'test_resnet' are not available" in message
    assert "network" in message and "checkpoint=PATH" in message
    assert "\n" not in message


def test_missing_checkpoint_and_classes_files_are_named(files, tmp_path):
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(DiginError, match=f"checkpoint file not found: {missing}"):
        load_classifier(f"timm:test_resnet,checkpoint={missing}")
    with pytest.raises(DiginError, match=f"classes file not found: {tmp_path / 'nope.txt'}"):
        load_classifier(timm_spec(files, classes=None) + f",classes={tmp_path / 'nope.txt'}")


def test_classes_file_with_wrong_line_count(files):
    with pytest.raises(DiginError, match=r"classes file .*three.txt has 3 names but .* has 4 outputs"):
        load_classifier(timm_spec(files, classes="three"))


def test_checkpoint_of_another_architecture(files):
    with pytest.raises(DiginError, match=r"checkpoint .*vit4.safetensors does not fit timm model 'test_resnet'"):
        load_classifier(timm_spec(files, "vit4", arch="test_resnet"))


def test_num_classes_without_checkpoint_is_refused():
    with pytest.raises(DiginError, match="num_classes= .* only applies together with checkpoint=PATH"):
        load_classifier("timm:test_resnet,num_classes=4")


@pytest.mark.parametrize(
    "spec, pattern",
    [
        ("resnet50", r"malformed classifier spec 'resnet50'; accepted forms: timm:NAME"),
        ("timm:", r"malformed classifier spec 'timm:'"),
        ("timm:test_resnet,classes", r"malformed option 'classes' .* key=value"),
        (
            "timm:test_resnet,colour=red",
            r"unknown option 'colour' in .*; timm: accepts act_layer, checkpoint, classes, mean, num_classes, size, std",
        ),
        (
            "keras:model.h5",
            r"unknown classifier kind 'keras' .* accepted forms: timm:NAME.*openclip:ARCH/PRETRAINED.*torchscript:PATH",
        ),
        ("timm:test_resnet,num_classes=four", r"num_classes='four' .* must be a positive integer"),
        ("timm:test_resnet,act_layer=leaky", r"unknown act_layer 'leaky' in .*; give a timm activation name"),
    ],
)
def test_malformed_specs(spec, pattern):
    with pytest.raises(DiginError, match=pattern):
        load_classifier(spec)


def test_builtin_prefixes_dispatch_through_the_registry(monkeypatch, files):
    calls = []

    def fake_loader(spec: str, device: torch.device) -> Classifier:
        calls.append((spec, device))
        return load_classifier(timm_spec(files))

    monkeypatch.setitem(BUILTIN_CLASSIFIER_LOADERS, "fake", fake_loader)
    classifier = load_classifier("fake:f", "cpu")
    assert calls == [("fake:f", torch.device("cpu"))]
    assert classifier.num_classes == 4


# --------------------------------------------------------------------------- open_clip


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> Path:
    """A tiny CLIP architecture registered with open_clip, and its random weights as a file."""
    folder = tmp_path_factory.mktemp("openclip")
    config = {
        "embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        # The real vocabulary size: the tokenizer is open_clip's real BPE tokenizer.
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    (folder / f"{TINY_CLIP}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder / f"{TINY_CLIP}.json")
    torch.manual_seed(0)
    model = open_clip.create_model(TINY_CLIP)
    torch.save(model.state_dict(), folder / "tiny-clip.pt")
    (folder / "shapes.txt").write_text("\n".join(SHAPES) + "\n")
    return folder


def count_zero_shot_builds(monkeypatch) -> list[int]:
    builds = []
    original = open_clip.build_zero_shot_classifier

    def counting(*args, **kwargs):
        builds.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(open_clip, "build_zero_shot_classifier", counting)
    return builds


def test_openclip_zero_shot_from_a_local_checkpoint(tiny_clip, monkeypatch):
    builds = count_zero_shot_builds(monkeypatch)
    spec = f"openclip:{TINY_CLIP}/{tiny_clip / 'tiny-clip.pt'},classes={tiny_clip / 'shapes.txt'}"
    classifier = load_classifier(spec)
    assert builds == [1]
    assert classifier.class_names == SHAPES

    # preprocessing from the model's own config: its image size, OpenAI mean/std for files
    preprocess = open_clip.get_model_preprocess_cfg(classifier.model.clip)
    assert classifier.input_size == (32, 32)
    assert classifier.mean.flatten().tolist() == pytest.approx(preprocess["mean"])
    assert classifier.std.flatten().tolist() == pytest.approx(open_clip.OPENAI_DATASET_STD)

    images = torch.rand(2, 3, 64, 64)
    logits = classifier(images)
    features = classifier.features(images)
    assert logits.shape == (2, 4) and features.shape == (2, 16)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2))
    # logits are 100 x cosine between the image embedding and each class embedding
    weights = classifier.model.class_weights  # (D, C)
    torch.testing.assert_close(weights.norm(dim=0), torch.ones(4))
    torch.testing.assert_close(logits, 100 * features @ weights)
    assert (logits.abs() <= 100 + 1e-4).all()
    assert_frozen_and_differentiable(classifier, images)

    # The weights are the same as open_clip builds itself with its real tokenizer.
    tokenizer = open_clip.get_tokenizer(TINY_CLIP)
    assert tokenizer("a photo of a circle.")[0, :3].tolist()[0] == 49406  # real BPE: <start_of_text>
    expected = open_clip.zero_shot_classifier.build_zero_shot_classifier(
        classifier.model.clip, tokenizer, SHAPES, open_clip.OPENAI_IMAGENET_TEMPLATES
    )
    torch.testing.assert_close(weights, expected)


def test_openclip_zero_shot_weights_are_cached_on_disk(tiny_clip, monkeypatch, tmp_path):
    builds = count_zero_shot_builds(monkeypatch)
    checkpoint = tiny_clip / "tiny-clip.pt"
    spec = f"openclip:{TINY_CLIP}/{checkpoint},classes={tiny_clip / 'shapes.txt'}"
    first = load_classifier(spec)
    cached = list((tmp_path / "digin-cache" / "zeroshot").glob("*.pt"))
    assert len(cached) == 1 and builds == [1]

    second = load_classifier(spec)
    assert builds == [1], "the second load must come from the cache"
    torch.testing.assert_close(first.model.class_weights, second.model.class_weights)

    # other class names -> another key -> built again
    (tmp_path / "two.txt").write_text("cat\ndog\n")
    load_classifier(f"openclip:{TINY_CLIP}/{checkpoint},classes={tmp_path / 'two.txt'}")
    assert builds == [1, 1]
    key = zero_shot_cache_path(TINY_CLIP, "x", ["cat", "dog"], open_clip.OPENAI_IMAGENET_TEMPLATES)
    assert key.parent == tmp_path / "digin-cache" / "zeroshot"


def test_openclip_mean_std_override(tiny_clip):
    spec = (
        f"openclip:{TINY_CLIP}/{tiny_clip / 'tiny-clip.pt'},classes={tiny_clip / 'shapes.txt'},"
        "mean=0.5;0.5;0.5,std=0.25;0.25;0.25"
    )
    classifier = load_classifier(spec)
    assert classifier.mean.flatten().tolist() == [0.5] * 3
    assert classifier.std.flatten().tolist() == [0.25] * 3


def test_openclip_errors(tiny_clip, tmp_path):
    with pytest.raises(DiginError, match=r"unknown open_clip architecture 'ViT-B-61' .*close matches: .*ViT-B-16"):
        load_classifier("openclip:ViT-B-61/laion2b_s34b_b88k")
    with pytest.raises(DiginError, match=r"needs an architecture and weights: openclip:ARCH/PRETRAINED"):
        load_classifier("openclip:ViT-B-16")
    not_a_tag = r"'laion9b' .* is neither a pretrained tag of ViT-B-16 nor an existing file; tags: .*laion2b_s34b_b88k"
    with pytest.raises(DiginError, match=not_a_tag):
        load_classifier("openclip:ViT-B-16/laion9b")
    offline = r"weights 'laion2b_s34b_b88k' for open_clip ViT-B-16 are not available .*network.*local file"
    with pytest.raises(DiginError, match=offline):
        load_classifier("openclip:ViT-B-16/laion2b_s34b_b88k")
    with pytest.raises(DiginError, match=r"classes file not found"):
        load_classifier(f"openclip:{TINY_CLIP}/{tiny_clip / 'tiny-clip.pt'},classes={tmp_path / 'none.txt'}")


# --------------------------------------------------------------------------- torchscript


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 3, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).mean(dim=(2, 3))  # (N, 3)


@pytest.fixture(scope="module")
def scripted(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("torchscript")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still the format users have
        torch.jit.script(TinyNet().eval()).save(str(folder / "net.pt"))
    (folder / "three.txt").write_text("red\ngreen\nblue\n")
    (folder / "shapes.txt").write_text("\n".join(SHAPES) + "\n")
    return {"model": folder / "net.pt", "three": folder / "three.txt", "shapes": folder / "shapes.txt"}


def test_torchscript_classifier(scripted):
    classifier = load_classifier(f"torchscript:{scripted['model']},classes={scripted['three']}")
    assert classifier.input_size == (224, 224)
    assert classifier.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert classifier.std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])
    images = torch.rand(2, 3, 100, 100)
    assert classifier(images).shape == (2, 3)
    assert resolve_class(classifier, "GREEN") == 1
    assert_frozen_and_differentiable(classifier, images)
    with pytest.raises(DiginError, match=r"features are not available for torchscript:"):
        classifier.features(images)


def test_torchscript_options(scripted):
    spec = f"torchscript:{scripted['model']},classes={scripted['three']},size=64x48,mean=0.5;0.5;0.5,std=0.5;0.5;0.5"
    classifier = load_classifier(spec)
    assert classifier.input_size == (64, 48)
    assert classifier.mean.flatten().tolist() == [0.5] * 3
    assert classifier(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_torchscript_errors(scripted, tmp_path):
    with pytest.raises(DiginError, match=r"needs a classes file: torchscript:PATH,classes=FILE"):
        load_classifier(f"torchscript:{scripted['model']}")
    with pytest.raises(DiginError, match=f"TorchScript model file not found: {tmp_path / 'none.pt'}"):
        load_classifier(f"torchscript:{tmp_path / 'none.pt'},classes={scripted['three']}")
    with pytest.raises(DiginError, match=r"has 4 names but .* has 3 outputs"):
        load_classifier(f"torchscript:{scripted['model']},classes={scripted['shapes']}")
    with pytest.raises(DiginError, match=r"mean='0.5;0.5' .* must be three numbers r;g;b"):
        load_classifier(f"torchscript:{scripted['model']},classes={scripted['three']},mean=0.5;0.5")
    with pytest.raises(DiginError, match=r"size='big' .* must be a positive integer or HxW"):
        load_classifier(f"torchscript:{scripted['model']},classes={scripted['three']},size=big")
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    with pytest.raises(DiginError, match=r"could not load .*garbage.pt as a TorchScript model"):
        load_classifier(f"torchscript:{tmp_path / 'garbage.pt'},classes={scripted['three']}")


def test_module_exports_the_documented_interface():
    # The package's names are the loaders' own objects: one registry, one loader.
    from digin_cli.models import load_classifier as public_loader
    from digin_cli.models.classifiers import class_names, specs

    assert classifiers.load_classifier is public_loader
    assert classifiers.resolve_class is class_names.resolve_class
    assert classifiers.BUILTIN_CLASSIFIER_LOADERS is specs.BUILTIN_CLASSIFIER_LOADERS
    assert {"tiny", "shapes"} <= set(classifiers.BUILTIN_CLASSIFIER_LOADERS)
