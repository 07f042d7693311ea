"""The DDIM update, eta = 0 (the paper's Eq. 1; Song et al. 2021, Eq. 12), in digin's own hands.

DDIMScheduler.step would do the same arithmetic, but it takes the previous timestep as
t - num_train_timesteps // N, which is off for "trailing" and "linspace" spacing whenever N
does not divide 1000 (a known diffusers bug), and it clips or thresholds x0 as the stored
config says (diffusers' default is clip_sample=True, which a folder whose config is an
Euler one never asked for). Here the previous timestep is the schedule's own next entry
(the final alpha after the last step), and x0 is never clipped. The expressions are
diffusers' own, so with a schedule diffusers gets right the values are the same.
"""

from __future__ import annotations

import torch


def previous_alpha_cumprod(scheduler, timesteps: list[int], index: int) -> torch.Tensor:
    """alpha_bar of the timestep that step `index` of `timesteps` (descending) goes to."""
    if index + 1 < len(timesteps):
        return scheduler.alphas_cumprod[timesteps[index + 1]]
    return scheduler.final_alpha_cumprod  # after the last step: 1 with set_alpha_to_one, else alpha_bar_0


def ddim_update(
    model_output: torch.Tensor, sample: torch.Tensor, alpha_prod_t: torch.Tensor, alpha_prod_t_prev: torch.Tensor,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """z_t (B, C, h, w) and the model's output -> (z_prev, x0-prediction), both (B, C, h, w)."""
    beta_prod_t = 1 - alpha_prod_t
    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(f"prediction_type {prediction_type!r} is not one of epsilon, sample, v_prediction")
    pred_sample_direction = (1 - alpha_prod_t_prev) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction
    return prev_sample, pred_original_sample
