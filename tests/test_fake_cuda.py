"""The GPU path checked on a CPU.

- FakeTensorMode with device "cuda" runs the forward paths on tensors that have a CUDA
  device and no data: a tensor left on the CPU meets a CUDA one and raises, and so does
  anything that reads a value on the host (`.item()`, `bool()`, `nonzero`).
- The meta device runs the chain, the loss and the backward of an optimization step,
  checkpointed or not, with prompt-to-prompt injection and a held region; two modes count
  every host-to-device copy made inside the step, which must be none once the run is
  under way (a copy per UNet call, loss term or attention layer stalls a GPU).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from digin_cli.attention import AttentionControl, TokenSpan, attach, token_mapping
from digin_cli.engine import GuidedDDIM, HoldRegion, OptimConfig, SamplerConfig, initial_latents, make_cutouts
from digin_cli.inversion import ddim_inversion
from digin_cli.objectives import Counterfactual, Disagreement, RegionDistance

SAMPLER = SamplerConfig(num_steps=3, guidance_scale=3.0)
aten = torch.ops.aten


# -- counting host-to-device copies ------------------------------------------------------


class _TensorCopies(TorchDispatchMode):
    """Copies of CPU tensors onto another device (`.to(device)`, `copy_`)."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is aten._to_copy.default:
            source, target = args[0], out
        elif func is aten.copy_.default:
            source, target = args[1], args[0]
        else:
            return out
        if isinstance(source, torch.Tensor) and source.device.type == "cpu" and target.device.type != "cpu":
            self.seen.append(f"{func}{tuple(source.shape)}")
        return out


class _DataCopies(TorchFunctionMode):
    """Tensors made from Python numbers or lists straight onto a device (torch.tensor(..., device=),
    new_tensor): a host-to-device copy that the dispatcher never sees."""

    def __init__(self, seen: list) -> None:
        super().__init__()
        self.seen = seen

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor, torch.Tensor.new_tensor):
            device = kwargs.get("device")
            if device is None and func is torch.Tensor.new_tensor:
                device = args[0].device
            if device is not None and torch.device(device).type != "cpu" and not isinstance(args[-1], torch.Tensor):
                self.seen.append(f"{func.__name__}({args[-1]!r:.40})")
        return func(*args, **kwargs)


class HostToDeviceCopies:
    """Every host-to-device copy made while open, listed in `seen`."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __enter__(self):
        self._modes = [_DataCopies(self.seen), _TensorCopies(self.seen)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def test_the_counter_sees_every_kind_of_host_to_device_copy():
    with HostToDeviceCopies() as copies:
        x = torch.zeros(3, device="meta")
        x + torch.tensor(2.0, device="meta")  # from a Python number
        x + torch.randn(3).to("meta")  # a CPU tensor moved
        x.new_tensor([1.0, 2.0, 3.0])  # from a list, onto x's device
        x.copy_(torch.ones(3))  # a CPU tensor copied into a device one
        x * 2 + torch.full((3,), 1.0, device="meta")  # made on the device: no copy
    assert len(copies.seen) == 4, copies.seen


# -- an optimization step on the meta device ----------------------------------------------


def _on(device: str, tiny_components, tiny_classifiers):
    engine = GuidedDDIM(tiny_components, device=device)
    f, g = (copy.deepcopy(c).to(device) for c in tiny_classifiers)  # the session's classifiers stay on the CPU
    return engine, f, g


def _counted_chain(engine: GuidedDDIM) -> list[list[str]]:
    """The host-to-device copies of each pass of the chain (and its backward), one list a pass."""
    passes: list[list[str]] = []
    original = engine._chain_and_backward

    def counted(*args, **kwargs):
        with HostToDeviceCopies() as copies:
            result = original(*args, **kwargs)
        passes.append(copies.seen)
        return result

    engine._chain_and_backward = counted
    return passes


def _recorded_control(engine: GuidedDDIM, z_T, prompt, null) -> AttentionControl:
    """Prompt-to-prompt as uvce runs it: each item's recording, a word-swap mapping, and its own injected steps."""
    controls = []
    for b in range(z_T.shape[0]):
        control = AttentionControl()
        control.record(store_steps=2, map_steps=0, map_tokens=None, map_side=16)
        with attach(engine, control):
            engine.sample(z_T[b : b + 1], prompt[b : b + 1], null[b : b + 1], SAMPLER)
        controls.append(control)
    mapping = token_mapping(TokenSpan(4, 5), TokenSpan(4, 6), engine.components.tokenizer.model_max_length)
    return AttentionControl.for_batch(controls, [mapping, None], [1, 2])


@pytest.mark.parametrize("checkpointing", [False, True])
def test_an_optimization_step_makes_no_host_to_device_copy(tiny_components, tiny_classifiers, checkpointing):
    engine, f, g = _on("meta", tiny_components, tiny_classifiers)
    z_T = initial_latents(tiny_components, [0, 1])
    prompt, null = engine.encode_text(["a photograph of a circle"] * 2), engine.null_embedding(2)
    control = _recorded_control(engine, z_T, prompt, null)
    side, latent_side = tiny_components.resolution, tiny_components.latent_shape[-1]
    hold = HoldRegion(torch.zeros(2, 1, latent_side, latent_side, device="meta"), torch.zeros(2, 1, side, side, device="meta"))
    distance = RegionDistance(torch.zeros(2, 3, side, side, device="meta"), torch.zeros(2, *tiny_components.latent_shape,
                              device="meta"), torch.ones(2, 1, side, side, device="meta"),
                              torch.ones(2, 1, latent_side, latent_side, device="meta"))  # fmt: skip
    objective = Counterfactual(f, [1, 2], [0, 0], distance)
    config = OptimConfig(loss_steps=2, num_cutouts=4, views_per_pass=2, gradient_checkpointing=checkpointing)
    passes = _counted_chain(engine)
    with attach(engine, control):
        for _ in range(2):  # the first pass makes the run's device copies (the schedule, the injected steps)
            gradients = engine.first_gradients(objective, z_T, prompt, null, SAMPLER, config, hold=hold)
    assert gradients["latent"].device.type == "meta" and gradients["latent"].shape == z_T.shape
    assert len(passes) == 2 and passes[1] == [], passes


# -- forward paths on fake CUDA tensors --------------------------------------------------


@pytest.fixture()
def fake_cuda(tiny_components, tiny_classifiers):
    """(engine, f, g, mode): everything on fake CUDA tensors, the schedule made beforehand
    (it is the scheduler's arithmetic on the CPU)."""
    f, g = (copy.deepcopy(c) for c in tiny_classifiers)  # the session's classifiers stay on the CPU
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        engine = GuidedDDIM(tiny_components, device="cuda")
        f, g = f.to("cuda"), g.to("cuda")
    engine.timesteps(SAMPLER.num_steps)
    return engine, f, g, mode


def test_sampling_and_the_objectives_run_on_one_cuda_device(fake_cuda):
    engine, f, g, mode = fake_cuda
    with mode:
        prompt, null = engine.encode_text(["a circle", "a star"]), engine.null_embedding(2)
        z_T = initial_latents(engine.components, [0, 1]).to(engine.device)
        images = engine.sample(z_T, prompt, null, SAMPLER)
        report = engine.start_report(Disagreement(f, g, 0), z_T, prompt, null, SAMPLER)
        views = make_cutouts(images, 4, 32, 0.5, 0.01, [torch.Generator() for _ in range(2)])
        trajectory = ddim_inversion(engine, z_T, prompt, SAMPLER.num_steps)
    assert images.device.type == "cuda" and images.shape == (2, 3, 64, 64)
    assert report.loss.device.type == "cuda" and views.device.type == "cuda"
    assert all(z.device.type == "cuda" for z in trajectory)


def test_prompt_to_prompt_runs_on_one_cuda_device(fake_cuda):
    engine, f, g, mode = fake_cuda
    with mode:
        prompt, null = engine.encode_text(["a circle", "a star"]), engine.null_embedding(2)
        z_T = initial_latents(engine.components, [0, 1]).to(engine.device)
        control = _recorded_control(engine, z_T, prompt, null)
        with attach(engine, control):
            edited = engine.sample(z_T, prompt, null, SAMPLER)
    assert edited.device.type == "cuda"
    assert all(stored.device.type == "cuda" for stored in control.stored.values())


def test_the_harness_catches_a_tensor_left_on_the_cpu(fake_cuda):
    engine, f, g, mode = fake_cuda
    with mode:
        z_T = initial_latents(engine.components, [0])  # forgotten: .to(engine.device)
        prompt, null = engine.encode_text(["a circle"]), engine.null_embedding()
        with pytest.raises(RuntimeError, match="device"):
            engine.run_chain(z_T, prompt.expand(3, -1, -1, -1), null.expand(3, -1, -1, -1), SAMPLER.guidance_scale)
