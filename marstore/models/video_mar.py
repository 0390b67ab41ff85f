"""A small video-action masked autoregressive model with UVA's interfaces (FIELD-NOTES §1).

Same forward signature and return value as UVA's `MAR` (`mar_con_unified.py`), and the same
module names: z_proj, z_proj_cond, proj_cond_x_layer, encoder_blocks.N, encoder_norm,
decoder_embed, decoder_blocks.N, decoder_norm, a video head (diffloss) and an action head
(diffactloss with conv, fc, refine). Small enough to run on two CPU cores in seconds. With
drop_masked=True the encoder drops masked tokens, so its token count varies per call, as in MAR;
with diffusion_batch_mul=m the video head runs on each token's row m times, as MAR's does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TASK_MODES = ("video_model", "dynamic_model", "policy_model", "inverse_model", "full_dynamic_model")


def _truncated_normal(low: float, high: float = 1.0, mean: float = 1.0, std: float = 0.25) -> float:
    """MAR's mask ratio: a normal draw cut to [low, high], from numpy's global generator."""
    while True:
        ratio = float(np.random.normal(mean, std))
        if low <= ratio <= high:
            return ratio


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class DiffHead(nn.Module):
    """Stands in for the diffusion loss heads: a small residual MLP on tokens."""

    def __init__(self, dim: int, out: int, depth: int = 2):
        super().__init__()
        self.net = nn.Module()
        self.net.res_blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU()) for _ in range(depth))
        self.net.final = nn.Linear(dim, out)

    def forward(self, z: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is not None:  # MAR's head denoises a noised target, conditioned on z
            z = z + noise
        for block in self.net.res_blocks:
            z = z + block(z)
        return self.net.final(z)


class ActionHead(nn.Module):
    """UVA's action head layout: conv over each frame's token grid, fc, refine to the horizon."""

    def __init__(self, dim: int, grid: int, frames: int, horizon: int, action_dim: int):
        super().__init__()
        self.frames, self.horizon = frames, horizon
        self.conv = nn.Conv2d(dim, dim, kernel_size=3, padding=1)
        self.fc = nn.Linear(dim, dim)
        self.refine = nn.Linear(dim * frames, horizon * dim)
        self.out = nn.Linear(dim, action_dim)
        self.grid = grid

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:  # (B, frames*grid*grid, D)
        b, _, d = tokens.shape
        x = tokens.reshape(b * self.frames, self.grid, self.grid, d).permute(0, 3, 1, 2)
        x = self.conv(x).mean(dim=(2, 3))  # (B*frames, D)
        x = self.fc(x).reshape(b, self.frames * d)
        x = self.refine(x).reshape(b, self.horizon, d)
        return self.out(x)


class VideoActionMAR(nn.Module):
    def __init__(
        self,
        *,
        task_name: str,
        shape_meta: dict,
        use_history_action: bool = False,
        embed_dim: int = 64,
        depth: int = 4,
        decoder_depth: int = 4,
        num_heads: int = 4,
        frames: int = 4,
        latent_channels: int = 4,
        grid: int = 4,
        drop_masked: bool = False,
        mask_ratio_min: float = 0.7,
        diffusion_batch_mul: int = 0,
    ):
        super().__init__()
        action_shape = shape_meta["action"]["shape"]
        self.task_name = task_name
        self.action_dim = int(action_shape[-1])
        self.horizon = int(shape_meta.get("horizon", 16))
        self.use_history_action = use_history_action
        self.frames, self.grid, self.channels = frames, grid, latent_channels
        self.tokens = frames * grid * grid
        self.drop_masked = drop_masked
        self.mask_ratio_min = mask_ratio_min
        self.diffusion_batch_mul = diffusion_batch_mul
        d = embed_dim
        self.z_proj = nn.Linear(latent_channels, d)
        self.z_proj_cond = nn.Linear(latent_channels, d)
        self.action_proj = nn.Linear(self.action_dim, d)
        self.proj_cond_x_layer = nn.Linear(2 * d, d)
        self.pos_embed = nn.Parameter(torch.randn(1, self.tokens, d) * 0.02)
        self.encoder_blocks = nn.ModuleList(Block(d, num_heads) for _ in range(depth))
        self.encoder_norm = nn.LayerNorm(d)
        self.decoder_embed = nn.Linear(d, d)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, d))
        self.decoder_blocks = nn.ModuleList(Block(d, num_heads) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(d)
        self.diffloss = DiffHead(d, latent_channels)
        self.diffactloss = ActionHead(d, grid, frames, self.horizon, self.action_dim)

    def _tokens(self, latents: torch.Tensor, proj: nn.Module) -> torch.Tensor:
        # (B, frames, C, h, w) -> (B, frames, h*w, D): 4-D, as UVA's z_proj outputs
        b, f, c, h, w = latents.shape
        return proj(latents.permute(0, 1, 3, 4, 2).reshape(b, f, h * w, c))

    def forward(self, imgs, cond, history_nactions=None, nactions=None, text_latents=None, task_mode=None,
                proprioception_input={}):  # noqa: B006 - UVA's signature, mutated as UVA does
        task_mode = task_mode or "policy_model"
        if task_mode not in TASK_MODES:
            raise ValueError(f"task_mode {task_mode!r} is not one of {TASK_MODES}")
        proprioception_input["task_mode"] = task_mode  # UVA mutates this dict in place too
        z = self._decode(imgs, cond, nactions, task_mode)
        zero = torch.zeros((), device=imgs.device)
        video_loss = act_loss = zero
        if task_mode in ("video_model", "dynamic_model", "full_dynamic_model"):
            video_loss = self._video_loss(z, imgs)
        if task_mode in ("policy_model", "inverse_model", "full_dynamic_model"):
            pred = self.diffactloss(z)
            act_loss = ((pred - nactions) ** 2).mean() if nactions is not None else pred.pow(2).mean() * 0
        return video_loss + act_loss, video_loss, act_loss

    def _video_loss(self, z: torch.Tensor, imgs: torch.Tensor) -> torch.Tensor:
        target = self._frame_tokens(imgs)
        if not self.diffusion_batch_mul:
            return ((self.diffloss(z) - target) ** 2).mean()
        # MAR's forward_loss: each token a row, the B*t rows repeated diffusion_batch_mul times
        # (x.repeat(m, 1), so the head's rows are ordered (m b t)), each copy with its own noise
        b, t, d = z.shape
        rows = z.reshape(b * t, d).repeat(self.diffusion_batch_mul, 1)
        target = target.reshape(b * t, -1).repeat(self.diffusion_batch_mul, 1)
        return ((self.diffloss(rows, torch.randn_like(rows)) - target) ** 2).mean()

    def _frame_tokens(self, imgs: torch.Tensor) -> torch.Tensor:
        """The frames as the video head predicts them: (B, tokens, channels)."""
        return imgs.permute(0, 1, 3, 4, 2).reshape(imgs.shape[0], self.tokens, self.channels)

    @torch.no_grad()
    def sample_frames(self, imgs, cond, nactions=None, task_mode: str = "dynamic_model", steps: int = 8) -> torch.Tensor:
        """UVA's sampling, reduced: the frames' tokens drawn from noise by `steps` denoising steps of
        the video head, each conditioned on the decoder's output and on the sample so far, so that
        the head's modules fire once a step (as UVA's diffloss.net.res_blocks do, 100 times by
        default). The noise is seeded: the same batch gives the same sample. (B, tokens, channels)"""
        z = self._decode(imgs, cond, nactions, task_mode)
        g = torch.Generator(device=imgs.device).manual_seed(0)
        x = torch.randn(z.shape[0], self.tokens, self.channels, generator=g, device=imgs.device, dtype=z.dtype)
        for i in range(steps):  # each step moves the sample part of the way to the head's prediction
            embedded = nn.functional.linear(x, self.z_proj.weight, self.z_proj.bias)  # not a call: z_proj fires once, in _decode
            x = x + (self.diffloss(z + embedded) - x) / (steps - i)
        return x

    def sample_orders(self, bsz: int) -> torch.Tensor:
        """MAR's: each sample's tokens in a random order (bsz, tokens), from numpy's global
        generator (np.random.shuffle), as MAR draws them."""
        orders = []
        for _ in range(bsz):
            order = np.arange(self.tokens)
            np.random.shuffle(order)
            orders.append(order)
        return torch.from_numpy(np.stack(orders)).long()

    def random_masking(self, x: torch.Tensor, orders: torch.Tensor) -> torch.Tensor:
        """MAR's: the mask (bsz, tokens), 1 where a token is masked: the first tokens of each
        order, as many as a ratio drawn once a call from a normal around 1 cut to
        [mask_ratio_min, 1] (MAR's scipy truncnorm, from numpy's global generator) says; one
        token is always kept (MAR keeps its buffer tokens)."""
        masked = min(int(np.ceil(self.tokens * _truncated_normal(self.mask_ratio_min))), self.tokens - 1)
        mask = torch.zeros(x.shape[0], self.tokens, device=x.device)
        return mask.scatter(-1, orders[:, :masked].to(x.device), 1.0)

    def _decode(self, imgs, cond, nactions, task_mode: str) -> torch.Tensor:
        """The decoder's output (B, tokens, D): what the heads read."""
        b = imgs.shape[0]
        x = self._tokens(imgs, self.z_proj)
        c = self._tokens(cond, self.z_proj_cond)
        if nactions is not None and task_mode in ("dynamic_model", "full_dynamic_model"):
            # dynamics modes condition on the actions; policy and inverse modes predict them
            c = c + self.action_proj(nactions).mean(dim=1)[:, None, None, :]
        tokens = self.proj_cond_x_layer(torch.cat([x, c], dim=-1)).reshape(b, self.tokens, -1) + self.pos_embed
        kept = None
        if self.drop_masked:  # MAR drops the masked tokens before the encoder, keeping the others in order
            mask = self.random_masking(tokens, self.sample_orders(b))
            kept = (mask == 0).nonzero(as_tuple=True)
            tokens = tokens[kept].reshape(b, -1, tokens.shape[-1])
        for block in self.encoder_blocks:
            tokens = block(tokens)
        tokens = self.encoder_norm(tokens)
        z = self.decoder_embed(tokens)
        if kept is not None:  # the mask token where a token was dropped
            full = self.mask_token.to(z.dtype).expand(b, self.tokens, -1).clone()  # z is bfloat16 under autocast
            full[kept] = z.reshape(-1, z.shape[-1])
            z = full
        for block in self.decoder_blocks:
            z = block(z)
        return self.decoder_norm(z)


def video_mar(
    task_name: str = "synthetic",
    shape_meta: dict | None = None,
    use_history_action: bool = False,
    **kwargs,
) -> VideoActionMAR:
    """The built-in model's factory (what `--model marstore.models:video_mar` calls)."""
    shape_meta = shape_meta or {"action": {"shape": [2]}, "horizon": 16}
    return VideoActionMAR(task_name=task_name, shape_meta=shape_meta, use_history_action=use_history_action, **kwargs)


def policy_forward(model: VideoActionMAR, batch: dict):
    """The forward for the synthetic data (`--forward`): UVA's policy mode, which predicts the
    actions (the loss's targets) from the frames."""
    return model(batch["imgs"], batch["cond"], nactions=batch["nactions"], task_mode="policy_model")


def sampling_forward(model: VideoActionMAR, batch: dict, steps: int = 8):
    """Sampling the frames in dynamics mode (`--forward`): the video head fires once per denoising
    step (`--multi-fire stack` keeps every step; `marstore probe --tokens each` probes each).
    Returns the sample's squared error against the true frames."""
    return ((model.sample_frames(batch["imgs"], batch["cond"], batch["nactions"], steps=steps)
             - model._frame_tokens(batch["imgs"])) ** 2).mean()


def dynamic_forward(model: VideoActionMAR, batch: dict):
    """UVA's dynamics mode (`--forward`): the actions condition the prediction of the frames."""
    return model(batch["imgs"], batch["cond"], nactions=batch["nactions"], task_mode="dynamic_model")
