"""GuidedDDIM: differentiable guided DDIM sampling over diffusers components (text
encoding, the UNet with autocast or compiled, the DDIM step, the chain with checkpointing,
decoding), and `optimize`, the DiG-IN loop that runs on it in numbered phases."""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch
from torch._dynamo.exc import TorchDynamoException
from torch.utils.checkpoint import checkpoint

from digin_cli.components import DiffusionComponents
from digin_cli.engine.conditioning import encode_prompts, null_condition, unet_conditions
from digin_cli.engine.ddim import ddim_update, previous_alpha_cumprod
from digin_cli.engine.configs import (
    CHECKPOINT_MEMORY_SHARE,
    NonFiniteLoss,
    OptimConfig,
    OptimizationResult,
    ProgressCallback,
    SamplerConfig,
    StepReport,
)
from digin_cli.engine.guards import Cone, noise_regularization
from digin_cli.engine.hold import HeldTrajectory, HoldRegion
from digin_cli.engine.inputs import make_views, view_generators
from digin_cli.engine.loop import AugmentedLoss, BestIterates, Variables, composite, per_step
from digin_cli.engine.memory import MemoryPlan, StepFootprint, available_memory, plan_memory, saved_activation_bytes
from digin_cli.errors import CompileFallbackWarning
from digin_cli.objectives import Objective, ObjectiveInput, ObjectiveOutput


def uses_guidance(guidance_scale: float) -> bool:
    """Classifier-free guidance as diffusers' pipelines apply it: only above 1."""
    return guidance_scale > 1


class GuidedDDIM:
    """Differentiable DDIM (eta = 0) with classifier-free guidance over diffusers components."""

    def __init__(
        self,
        components: DiffusionComponents,
        device: torch.device | str = "cpu",
        unet_dtype: torch.dtype | None = None,
        compile_unet: bool = False,
    ) -> None:
        self.components = components
        self.device = torch.device(device)
        # bf16/fp16 autocast of the UNet only: z_T, embeddings, optimizer and VAE stay fp32.
        self.unet_dtype = unet_dtype
        # fp16's gradients underflow below 6e-8: its backward passes scale the loss (loop.py).
        self.loss_scaling = unet_dtype == torch.float16
        # torch.compile (TorchInductor) of the UNet, used only inside optimize() and only
        # while no attention is recorded or injected: there the same shapes repeat at every
        # step, so compiling once (tens of seconds on a CPU, forward and backward) pays
        # off. Sampling, inversion and attention control stay eager: their changing shapes,
        # grad modes and attention processors would each trigger a recompile.
        self.compiled_unet = torch.compile(components.unet) if compile_unet else None
        self._use_compiled = False
        self._timesteps: list[int] = []  # the schedule of the last timesteps() call
        # Schedules by number of steps, made by `_schedules_of`, and their timesteps on the
        # device (made at the first UNet call): a timestep tensor built for every UNet call
        # would be a host-to-device copy each time.
        self._schedules: dict[int, list[int]] = {}
        self._schedules_of = None
        self._timesteps_on_device: dict[int, dict[int, torch.Tensor]] = {}  # num_steps -> timestep -> ()
        # The memory plan of the run's first optimize (engine/memory.py), reused while the
        # batch is no larger: a later batch must not decide otherwise on a fuller allocator.
        self._memory_plans: dict[tuple, tuple[int, MemoryPlan]] = {}
        # Told the step index at the start of every DDIM step (prompt-to-prompt attention
        # control, see attention.py); None when nothing needs to know.
        self.step_observer = None
        for module in (components.unet, components.vae, *components.text_encoders):
            module.to(self.device).eval().requires_grad_(False)

    # -- building blocks -------------------------------------------------

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings exactly as the family's diffusers pipeline computes them, packed
        (engine/conditioning.py): (B, L, D)."""
        return encode_prompts(self.components, prompts, self.device)

    @torch.no_grad()
    def null_embedding(self, batch: int = 1) -> torch.Tensor:
        """The unconditional embedding of classifier-free guidance, (batch, L, D)."""
        return null_condition(self.components, batch, self.device)

    def timesteps(self, num_steps: int) -> list[int]:
        """The schedule of `num_steps` DDIM steps, descending (the scheduler's own spacing);
        made once per number of steps (and scheduler), with its copy on the device."""
        scheduler = self.components.scheduler
        if self._schedules_of is not scheduler:
            self._schedules, self._timesteps_on_device, self._schedules_of = {}, {}, scheduler
        if num_steps not in self._schedules:
            scheduler.set_timesteps(num_steps)
            self._schedules[num_steps] = [int(t) for t in scheduler.timesteps]
        self._timesteps = self._schedules[num_steps]
        return self._timesteps

    def _timestep_tensor(self, timestep: int) -> torch.Tensor:
        """`timestep` of the current schedule as a 0-d tensor on the device, made once per schedule."""
        on_device = self._timesteps_on_device.get(len(self._timesteps))
        if on_device is None:
            steps = torch.tensor(self._timesteps, device=self.device)  # (T,): one copy per schedule
            on_device = {t: steps[i] for i, t in enumerate(self._timesteps)}
            self._timesteps_on_device[len(self._timesteps)] = on_device
        if timestep not in on_device:  # a timestep outside the current schedule (a caller's own)
            return torch.tensor(timestep, device=self.device)
        return on_device[timestep]

    def _unet_autocast(self):
        if self.unet_dtype is None or self.unet_dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.unet_dtype)

    @contextmanager
    def _compiled_unet(self) -> Iterator[None]:
        """Inside: the UNet calls go to the compiled UNet, if there is one and no attention control is attached."""
        self._use_compiled = self.compiled_unet is not None and self.step_observer is None
        try:
            yield
        finally:
            self._use_compiled = False

    def predict_noise(self, latents: torch.Tensor, timestep: int, embeddings: torch.Tensor) -> torch.Tensor:
        """The UNet's output for (N, C, h, w) latents and (N, L, D) embeddings, in fp32."""
        model_input = self.components.scheduler.scale_model_input(latents, timestep)
        t = self._timestep_tensor(timestep)
        states, added = unet_conditions(self.components, embeddings)
        with self._unet_autocast():
            unet = self.compiled_unet if self._use_compiled else self.components.unet
            return unet(model_input, t, encoder_hidden_states=states, added_cond_kwargs=added).sample.float()

    def denoise_step(
        self,
        latents: torch.Tensor,
        timestep: int,
        prompt_emb: torch.Tensor,
        null_emb: torch.Tensor,
        guidance_scale: float,
        step_index: int = 0,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One guided DDIM step z_t -> (z_{t-1}, x0-prediction), both (B, C, h, w); `step_index`
        is the step's place in the schedule of the last `timesteps` call.

        As diffusers' pipelines: with guidance above 1 the conditional and unconditional
        predictions come from one batched UNet call; at 1 or below (the Turbo models' 0)
        the conditional prediction alone, one UNet call, and `null_emb` is not used.
        """
        if self.step_observer is not None:
            # Inside the (checkpointed) step, so a recomputation in backward sees the right index.
            self.step_observer.begin_step(step_index)
        if uses_guidance(guidance_scale):
            embeddings = torch.cat([null_emb, prompt_emb])  # (2B, L, D)
            noise_pred = self.predict_noise(torch.cat([latents, latents]), timestep, embeddings)  # [uncond; cond]
            noise_uncond, noise_cond = noise_pred.chunk(2)  # (B, C, h, w) each
            guided = noise_uncond + guidance_scale * (noise_cond - noise_uncond)
        else:
            guided = self.predict_noise(latents, timestep, prompt_emb)  # (B, C, h, w)
        return self.ddim_step(guided, step_index, latents)

    def ddim_step(self, model_output: torch.Tensor, step_index: int, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The DDIM update of step `step_index` (engine/ddim.py): (z_prev, x0), both (B, C, h, w)."""
        alpha_t, alpha_prev = self._step_alphas(step_index)
        return ddim_update(model_output, latents, alpha_t, alpha_prev, self.components.scheduler.config.prediction_type)

    def inverse_ddim_step(self, model_output: torch.Tensor, step_index: int, latents: torch.Tensor) -> torch.Tensor:
        """The inverse of forward step `step_index`: from the latents it lands on to those at its
        timestep (B, C, h, w), with the model's output at that timestep (DDIM inversion)."""
        alpha_to, alpha_from = self._step_alphas(step_index)
        return ddim_update(model_output, latents, alpha_from, alpha_to, self.components.scheduler.config.prediction_type)[0]

    def _step_alphas(self, step_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha_bar at step `step_index`'s timestep and at the one it goes to (the schedule's next)."""
        scheduler = self.components.scheduler
        return scheduler.alphas_cumprod[self._timesteps[step_index]], previous_alpha_cumprod(scheduler, self._timesteps, step_index)

    def run_chain(
        self,
        z_T: torch.Tensor,
        prompt_embs: torch.Tensor,
        null_embs: torch.Tensor,
        guidance_scale: float,
        keep_last: int = 0,
        use_checkpoint: bool = False,
        hold: HeldTrajectory | None = None,
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run all DDIM steps from z_T.

        z_T: (B, C, h, w); prompt_embs, null_embs: (T, B, L, D), one embedding per step.
        Returns z_0 and the x0-predictions of the last `keep_last` steps (oldest first).
        With `use_checkpoint`, every step is recomputed during backward instead of being
        stored, so memory does not grow with T. With `hold`, its region follows its
        reference trajectory.
        """
        timesteps = self.timesteps(prompt_embs.shape[0])
        latents = z_T if hold is None else hold.blend(0, z_T)
        kept: list[torch.Tensor] = []
        for i, t in enumerate(timesteps):
            if use_checkpoint:
                latents, x0 = checkpoint(
                    self.denoise_step, latents, t, prompt_embs[i], null_embs[i], guidance_scale, i, use_reentrant=False
                )
            else:
                latents, x0 = self.denoise_step(latents, t, prompt_embs[i], null_embs[i], guidance_scale, i)
            if hold is not None:
                latents, x0 = hold.blend(i + 1, latents), hold.blend_x0(i, x0)
            if i >= len(timesteps) - keep_last:
                kept.append(x0)
        return latents, kept

    @torch.no_grad()
    def reference_trajectory(
        self, z_T: torch.Tensor, prompt_embs: torch.Tensor, null_embs: torch.Tensor, guidance_scale: float, region: HoldRegion
    ) -> HeldTrajectory:
        """The trajectory from z_T with the given (T, B, L, D) embeddings, to be held inside
        `region`: for an inverted image, its reconstruction's trajectory."""
        latents, x0s = [z_T], []
        for i, t in enumerate(self.timesteps(prompt_embs.shape[0])):
            z, x0 = self.denoise_step(latents[-1], t, prompt_embs[i], null_embs[i], guidance_scale, i)
            latents.append(z)
            x0s.append(x0)
        pixel_mask = image = None
        if region.pixel_mask is not None:
            pixel_mask, image = region.pixel_mask.to(z_T), self.decode(latents[-1])
        return HeldTrajectory(region.latent_mask.to(z_T), torch.stack(latents), torch.stack(x0s), pixel_mask, image)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.components.vae
        image = vae.decode(latents.float() / vae.config.scaling_factor).sample  # (B, 3, H, W) in [-1, 1]
        return (image / 2 + 0.5).clamp(0, 1)

    def decode(self, latents: torch.Tensor, use_checkpoint: bool = False) -> torch.Tensor:
        """VAE decode in fp32 to images in [0, 1]: (B, C, h, w) -> (B, 3, H, W)."""
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(self._decode, latents, use_reentrant=False)
        return self._decode(latents)

    @torch.no_grad()
    def sample(
        self,
        z_T: torch.Tensor,
        prompt_emb: torch.Tensor,
        null_emb: torch.Tensor,
        config: SamplerConfig,
    ) -> torch.Tensor:
        """A plain forward sample (no optimization): (B, C, h, w) -> images (B, 3, H, W)."""
        T = config.num_steps
        prompt_embs = per_step(prompt_emb, T)
        null_embs = per_step(null_emb, T)
        z_0, _ = self.run_chain(z_T.to(self.device), prompt_embs, null_embs, config.guidance_scale)
        return self.decode(z_0)

    @torch.no_grad()
    def start_report(
        self, objective: Objective, z_T: torch.Tensor, prompt_emb: torch.Tensor, null_emb: torch.Tensor,
        sampler: SamplerConfig,
    ) -> ObjectiveOutput:  # fmt: skip
        """The objective on the start `optimize` would begin from (its iterate 0, no held
        region), without optimizing: to choose between starts before paying for the
        optimization, as the reference's prompt-to-prompt schedule search does."""
        T = sampler.num_steps
        z_0, _ = self.run_chain(z_T.to(self.device), per_step(prompt_emb, T), per_step(null_emb, T), sampler.guidance_scale)
        report, _ = self._plain_report(objective, z_0, None)
        return report

    @torch.no_grad()
    def start_views_loss(
        self, objective: Objective, z_T: torch.Tensor, prompt_emb: torch.Tensor, null_emb: torch.Tensor,
        sampler: SamplerConfig, config: OptimConfig, cone: Cone | None = None,
    ) -> torch.Tensor:  # fmt: skip
        """A start's guarded loss, (B,), without optimizing: the objective on the augmented views
        (config.augment, seeded by config.seed, as the optimization draws them) of the last
        DDIM step's x0-prediction, plus, with a cone, its reference's loss on the same views.
        To rank starts (the prompt-to-prompt search) by what the optimization will descend,
        not by the plain image alone, which an over-fitted start can satisfy."""
        config = config.resolved(self.components)
        T = sampler.num_steps
        _, kept = self.run_chain(z_T.to(self.device), per_step(prompt_emb, T), per_step(null_emb, T), sampler.guidance_scale,
                                 keep_last=1)  # fmt: skip
        x0 = kept[-1]  # (B, C, h, w)
        images = self.decode(x0)  # (B, 3, H, W)
        views = make_views(images, config, view_generators(self.device, config.seed, x0.shape[0]))  # (B, V, 3, S, S)
        per_pass = config.views_per_pass or views.shape[1]
        losses = [lambda part: objective(ObjectiveInput(images, x0, part)).loss] + ([cone.reference] if cone else [])
        total = torch.zeros(x0.shape[0], device=self.device)
        for loss in losses:
            # Pass by pass, weighted by its share of the views, as AugmentedLoss adds them up.
            for first in range(0, views.shape[1], per_pass):
                part = views[:, first : first + per_pass]  # (B, n, 3, S, S)
                total = total + loss(part).float() * (part.shape[1] / views.shape[1])
        return total

    # -- the DiG-IN optimization -----------------------------------------

    def optimize(
        self,
        objective: Objective,
        z_T: torch.Tensor,
        prompt_emb: torch.Tensor,
        null_emb: torch.Tensor,
        sampler: SamplerConfig,
        config: OptimConfig,
        on_step: ProgressCallback | None = None,
        hold: HoldRegion | None = None,
        cone: Cone | None = None,
    ) -> OptimizationResult:
        """Optimize z_T and per-step prompt / null-text deltas to minimize `objective`.

        z_T: (B, C, h, w). prompt_emb: (B, L, D) or per step (T, B, L, D). null_emb likewise
        (per-step null embeddings come from null-text inversion). Every item is optimized
        independently (per-item losses are summed, Adam is elementwise), and every item
        keeps its own iterate by config.keep (default: the lowest non-augmented loss).
        hold: what of every item stays as the unoptimized start has it (see HoldRegion,
        HeldTrajectory); None holds nothing.
        cone: the objective's gradient with respect to the classifier views is projected onto
        the cone around a reference's (engine/guards.py, Cone); None projects nothing.
        """
        started = time.perf_counter()
        # 1-4. The variables, the loss, the memory plan and the held region.
        config, variables, loss, held = self._prepare(objective, z_T, prompt_emb, null_emb, sampler, config, hold, cone)
        # 5. The loop: iterate 0 is the start; every iterate is judged on its plain image.
        total = config.steps if variables.optimizer is not None else 0
        best = BestIterates(variables.latent, config.keep, config.claim_margin)
        with self._compiled_unet():
            for step in range(total + 1):
                update = step < total
                z_0 = self._pass(variables, loss, sampler, config, held, update)
                report, images = self._plain_report(objective, z_0, held)
                finite = torch.isfinite(report.loss.detach())  # (B,)
                if not finite.all():
                    raise NonFiniteLoss(step, torch.nonzero(~finite).flatten().tolist())
                best.observe(step, report, images, variables.latent)
                if on_step is not None:
                    on_step(StepReport(step=step, total=total, loss=best.last_loss, metrics=best.last_metrics))
                if update:
                    variables.update()
        # 6. Each item's kept iterate.
        return best.result(seconds=time.perf_counter() - started)

    def first_gradients(
        self, objective: Objective, z_T: torch.Tensor, prompt_emb: torch.Tensor, null_emb: torch.Tensor,
        sampler: SamplerConfig, config: OptimConfig, hold: HoldRegion | None = None, cone: Cone | None = None,
    ) -> dict[str, torch.Tensor | None]:  # fmt: skip
        """What the first update of `optimize` descends: the gradients of the augmented loss at
        the start, unscaled, by variable ("latent" (B, C, h, w), "prompt" and "null"
        (T, B, L, D); None where that is no variable)."""
        config, variables, loss, held = self._prepare(objective, z_T, prompt_emb, null_emb, sampler, config, hold, cone)
        with self._compiled_unet():
            self._pass(variables, loss, sampler, config, held, update=True)
        return variables.gradients()

    def _prepare(self, objective: Objective, z_T: torch.Tensor, prompt_emb: torch.Tensor, null_emb: torch.Tensor,
                 sampler: SamplerConfig, config: OptimConfig, hold: HoldRegion | None, cone: Cone | None = None,
                 ) -> tuple[OptimConfig, Variables, AugmentedLoss, HeldTrajectory | None]:  # fmt: skip
        """What an optimization starts from, every default made concrete."""
        # 1. Check inputs and make every default concrete.
        config.validate()
        config = config.resolved(self.components)
        T = sampler.num_steps
        if not 1 <= config.loss_steps <= T:
            raise ValueError(f"loss_steps must be between 1 and the number of DDIM steps ({T})")
        # 2. The variables, their optimizer and (fp16) loss scaling.
        variables = Variables.create(z_T, prompt_emb, null_emb, T, config, self.device, uses_guidance(sampler.guidance_scale),
                                     loss_scaling=self.loss_scaling)  # fmt: skip
        # 3. The loss: its placement on the last K x0-predictions and its augmentations; whether
        #    the chain is checkpointed and how many views a pass (auto: what fits the budget).
        loss = AugmentedLoss.create(objective, config, batch=z_T.shape[0], device=self.device, cone=cone)
        config = self._with_memory_plan(objective, variables, sampler, config, cone)
        # 4. The held region's reference trajectory. Computed eagerly, before the compiled
        #    UNet is switched on: a no-grad call would make it compile a second graph.
        held = None
        if hold is not None:
            held = self.reference_trajectory(
                variables.latent.detach(), variables.prompt_base, variables.null_base, sampler.guidance_scale, hold
            )
        return config, variables, loss, held

    def _pass(self, variables: Variables, loss: AugmentedLoss, sampler: SamplerConfig, config: OptimConfig,
              held: HeldTrajectory | None, update: bool) -> torch.Tensor:  # fmt: skip
        """One pass of the chain (and backward, when updating). A compiled UNet that fails to
        compile at run time (no C compiler, an unsupported operator, a failing backward
        graph inside checkpointing) is dropped with one warning and the pass runs again eagerly."""
        try:
            with torch.set_grad_enabled(update):
                return self._chain_and_backward(variables, loss, sampler, config, held, update)
        except TorchDynamoException as error:
            if not self._use_compiled:
                raise
            cause = getattr(error, "inner_exception", None) or error  # the backend's own error, where it has one
            reason = (str(cause).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile of the UNet failed ({type(cause).__name__}: {reason}); running it eagerly",
                          CompileFallbackWarning, stacklevel=2)  # fmt: skip
            self.compiled_unet, self._use_compiled = None, False
            variables.zero_grad()
            with torch.set_grad_enabled(update):
                return self._chain_and_backward(variables, loss, sampler, config, held, update)

    def _chain_and_backward(
        self,
        variables: Variables,
        loss: AugmentedLoss,
        sampler: SamplerConfig,
        config: OptimConfig,
        held: HeldTrajectory | None,
        update: bool,
    ) -> torch.Tensor:
        """One pass of the chain from the current variables; when updating, the augmented loss on
        the last K x0-predictions is backpropagated. Returns z_0 (B, C, h, w)."""
        prompt_embs, null_embs = variables.embeddings()  # (T, B, L, D) each
        z_0, x0_preds = self.run_chain(
            variables.latent,
            prompt_embs,
            null_embs,
            sampler.guidance_scale,
            keep_last=config.loss_steps if update else 0,
            use_checkpoint=update and config.gradient_checkpointing,
            hold=held,
        )
        if update:
            checkpoint_decode = config.gradient_checkpointing and config.checkpoint_decode
            batch = variables.latent.shape[0]

            def decode(x0: torch.Tensor) -> torch.Tensor:  # (k * B, C, h, w) -> (k * B, 3, H, W), the held region laid over
                images = self.decode(x0, use_checkpoint=checkpoint_decode)
                return torch.cat([composite(held, chunk) for chunk in images.split(batch)])

            # Without checkpointing the activations fit the budget: one batched decode of the K predictions.
            loss.backward(x0_preds, decode, config.views_per_pass, batched=not config.gradient_checkpointing,
                          scale=variables.scaler.scale)  # fmt: skip
            if config.noise_reg > 0 and variables.latent.requires_grad:
                # z_T's own term (engine/guards.py): straight into its gradient, beside the chain's.
                sigma = float(self.components.scheduler.init_noise_sigma)
                atypical = noise_regularization(variables.latent, sigma)  # (B,)
                variables.scaler.scale(config.noise_reg * atypical.sum()).backward()
        return z_0

    def _with_memory_plan(self, objective: Objective, variables: Variables, sampler: SamplerConfig,
                          config: OptimConfig, cone: Cone | None = None) -> OptimConfig:  # fmt: skip
        """The config with `gradient_checkpointing` and `views_per_pass` concrete: as given, else
        the plan of what fits CHECKPOINT_MEMORY_SHARE of the available memory (engine/memory.py).
        A run plans once, at its first batch, and keeps the plan for batches no larger."""
        if config.gradient_checkpointing is not None and config.views_per_pass is not None:
            return config
        batch = variables.latent.shape[0]
        key = (type(objective).__name__, sampler.num_steps, sampler.guidance_scale, config.loss_steps, config.num_cutouts,
               config.view_size, config.gradient_checkpointing, config.views_per_pass, config.checkpoint_decode,
               None if cone is None else type(cone.reference).__name__)  # fmt: skip
        planned = self._memory_plans.get(key)
        if planned is None or planned[0] < batch:
            budget = CHECKPOINT_MEMORY_SHARE * available_memory(self.device)
            plan = plan_memory(self._footprint(objective, variables, sampler, config, cone), budget, batch, sampler.num_steps,
                               config.loss_steps, config.views_per_pass or config.num_cutouts,
                               checkpoint=config.gradient_checkpointing, checkpoint_decode=config.checkpoint_decode,
                               fixed_views=config.views_per_pass is not None)  # fmt: skip
            self._memory_plans[key] = planned = (batch, plan)
        plan = planned[1]
        checkpoint = plan.checkpoint if config.gradient_checkpointing is None else config.gradient_checkpointing
        return replace(config, gradient_checkpointing=checkpoint, views_per_pass=config.views_per_pass or plan.views_per_pass)

    def _footprint(self, objective: Objective, variables: Variables, sampler: SamplerConfig,
                   config: OptimConfig, cone: Cone | None = None) -> StepFootprint:  # fmt: skip
        """Saved-activation bytes, measured eagerly: one DDIM step of this batch, one item's decode,
        and the objective on one view of each item (random-free stand-in images); with a cone,
        the larger of that and its reference's (their passes run one after the other)."""
        prompt_embs, null_embs = variables.embeddings()
        latent = variables.latent.detach().requires_grad_(True)  # (B, C, h, w)
        self.timesteps(sampler.num_steps)
        step = saved_activation_bytes(
            lambda: self.denoise_step(latent, self._timesteps[0], prompt_embs[0], null_embs[0], sampler.guidance_scale)
        )
        decode = saved_activation_bytes(lambda: self.decode(latent[:1]))
        batch, side, size = latent.shape[0], self.components.resolution, config.view_size
        images = torch.full((batch, 3, side, side), 0.5, device=self.device, requires_grad=True)
        views = torch.full((batch, 1, 3, size, size), 0.5, device=self.device, requires_grad=True)
        view = saved_activation_bytes(lambda: objective(ObjectiveInput(images, latent, views)).loss)
        if cone is not None:
            view = max(view, saved_activation_bytes(lambda: cone.reference(views)))
        return StepFootprint(ddim_step=step, decode=decode, view=view)

    @torch.no_grad()
    def _plain_report(
        self, objective: Objective, z_0: torch.Tensor, held: HeldTrajectory | None
    ) -> tuple[ObjectiveOutput, torch.Tensor]:
        """The objective on the plain, non-augmented image of an iterate: (report, images (B, 3, H, W))."""
        z_0 = z_0.detach()
        images = composite(held, self.decode(z_0))
        return objective(ObjectiveInput(images, z_0, images.unsqueeze(1))), images
