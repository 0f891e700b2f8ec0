"""PyTorch twins of the benchmarked workloads: what a user would write instead of jaxml.

Same architecture (layer for layer; parameter counts are reported next to jaxml's), same
batch, same optimizer (AdamW or SGD-Nesterov with the config's hyperparameters, decay off
biases and norms, gradient clipping where the config clips) and the same per-example
augmentation (random crop) or diffusion loss. Written the way PyTorch users write it:
channels-first convolutions, `F.scaled_dot_product_attention`, `nn.LSTM`. Needs the optional
`bench` extra (`pip install -e .[bench]`): import this module only where torch is installed.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def build(w, compiled: bool, device: str = "cpu"):
    """(window(n) running n train steps, parameter count) of `w`'s PyTorch twin; `compiled` wraps the model in torch.compile."""
    torch.manual_seed(0)
    dev = torch.device("cuda" if device == "gpu" else "cpu")
    model, loss_fn, batch = _twin(w, dev)
    params = sum(p.numel() for p in model.parameters())
    forward = torch.compile(model) if compiled else model
    opt = _optimizer(model, w.config.optim)
    clip = w.config.optim.clip_norm
    ema = [p.detach().clone() for p in model.parameters()] if w.config.optim.ema_decay > 0 else None
    autocast = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=w.dtype == "bfloat16")
    model.train()

    def step():
        with autocast:
            loss = loss_fn(forward, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if ema is not None:
            with torch.no_grad():
                torch._foreach_lerp_(ema, list(model.parameters()), 1.0 - w.config.optim.ema_decay)
        return loss

    def window(n: int):
        for _ in range(n):
            loss = step()
        loss.item()  # waits for the device (a no-op wait on CPU, where every op is synchronous)

    return window, params


def _optimizer(model, oc):
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": oc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if oc.name == "adamw":
        return torch.optim.AdamW(groups, lr=oc.lr, betas=(oc.b1, oc.b2), eps=oc.eps)
    if oc.name == "nesterov":
        return torch.optim.SGD(groups, lr=oc.lr, momentum=oc.momentum, nesterov=True)
    raise ValueError(f"no PyTorch twin for optimizer {oc.name!r}")


def _twin(w, dev):
    """(model, loss_fn(model, batch), device batch) for workload `w`."""
    c, m = w.config, w.config.model
    if w.kind == "lm":
        tokens = torch.as_tensor(w.batch["tokens"], dtype=torch.long, device=dev)
        model = GPT(m) if w.name == "gpt" else CharLSTM(m)

        def lm_loss(net, tokens):
            logits = net(tokens[:, :-1]).float()
            return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        return model.to(dev), lm_loss, tokens

    images = torch.as_tensor(w.batch["image"], device=dev).permute(0, 3, 1, 2).contiguous()  # NCHW, uint8
    labels = torch.as_tensor(w.batch["label"], dtype=torch.long, device=dev)
    channels, side = images.shape[1], images.shape[2]
    if w.kind == "diffusion":
        model = UNet(m, channels)
        betas = np.linspace(1e-4, 0.02, c.diffusion.num_steps)
        alpha_bar = torch.as_tensor(np.cumprod(1.0 - betas), dtype=torch.float32, device=dev)

        def diffusion_loss(net, batch):
            x0 = batch[0].float() / 127.5 - 1.0
            t = torch.randint(0, c.diffusion.num_steps, (x0.shape[0],), device=dev)
            noise = torch.randn_like(x0)
            drop = torch.rand(x0.shape[0], device=dev) < c.diffusion.p_uncond
            y = torch.where(drop, torch.full_like(batch[1], m.num_classes), batch[1])
            a = alpha_bar[t][:, None, None, None]
            x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
            return F.mse_loss(net(x_t, t, y).float(), noise)
        return model.to(dev), diffusion_loss, (images, labels)

    if w.name == "cnn":
        model = CNN(m, channels, side)
    elif w.name in ("resnet20", "resnet50"):
        model = ResNet(m.num_classes, m.variant)
    elif w.name == "vit":
        model = ViT(m, channels, side)
    else:
        raise ValueError(f"no PyTorch twin for {w.name!r}")
    pad = c.data.augment.crop_padding

    def classifier_loss(net, batch):
        x = _random_crop(batch[0].float() / 255.0, pad)
        if c.data.augment.flip:
            flip = torch.rand(x.shape[0], device=dev) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
        return F.cross_entropy(net(x).float(), batch[1])
    return model.to(dev), classifier_loss, (images, labels)


def _random_crop(x_BxCxHxW, pad: int):
    """Zero-pad by `pad`, then crop every example back at its own random offset (jaxml.data.augment's crop)."""
    if pad == 0:
        return x_BxCxHxW
    b, c, h, w = x_BxCxHxW.shape
    dev = x_BxCxHxW.device
    padded = F.pad(x_BxCxHxW, (pad, pad, pad, pad))
    rows = torch.randint(0, 2 * pad + 1, (b, 1), device=dev) + torch.arange(h, device=dev)
    cols = torch.randint(0, 2 * pad + 1, (b, 1), device=dev) + torch.arange(w, device=dev)
    return padded[torch.arange(b, device=dev)[:, None, None, None], torch.arange(c, device=dev)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


class CNN(nn.Module):
    def __init__(self, m, channels, side):
        super().__init__()
        layers = []
        for i, width in enumerate(m.features):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.ReLU()]
            channels = width
            if i in m.pool_after:
                layers.append(nn.MaxPool2d(2))
                side //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, m.dense), nn.ReLU(),
                                  nn.Dropout(m.dropout), nn.Linear(m.dense, m.num_classes))

    def forward(self, x):
        return self.head(self.features(x))


def _bn(c):
    return nn.BatchNorm2d(c, momentum=0.1, eps=1e-5)


class Basic(nn.Module):
    expansion = 1

    def __init__(self, cin, width, stride, shortcut):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False), _bn(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, 1, 1, bias=False), _bn(width)
        self.short = Shortcut(cin, width, stride, shortcut)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        return F.relu(self.b2(self.c2(y)) + self.short(x))

class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, width, stride, shortcut):
        super().__init__()
        out = width * 4
        self.c1, self.b1 = nn.Conv2d(cin, width, 1, bias=False), _bn(width)
        self.c2, self.b2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), _bn(width)
        self.c3, self.b3 = nn.Conv2d(width, out, 1, bias=False), _bn(out)
        self.short = Shortcut(cin, out, stride, shortcut)

    def forward(self, x):
        y = F.relu(self.b1(self.c1(x)))
        y = F.relu(self.b2(self.c2(y)))
        return F.relu(self.b3(self.c3(y)) + self.short(x))

class Shortcut(nn.Module):
    def __init__(self, cin, cout, stride, kind):
        super().__init__()
        self.stride, self.extra, self.proj = stride, cout - cin, None
        if (stride != 1 or cin != cout) and kind == "projection":
            self.proj = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _bn(cout))
        self.identity = stride == 1 and cin == cout

    def forward(self, x):
        if self.identity:
            return x
        if self.proj is not None:
            return self.proj(x)
        x = x[:, :, ::self.stride, ::self.stride]  # option A: subsample, zero-pad channels
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))

class ResNet(nn.Module):
    def __init__(self, num_classes, variant):
        super().__init__()
        if variant in ("resnet20", "tiny"):  # jaxml.models.resnet.ResNet20 / Tiny: CIFAR stem, option-A shortcuts
            stages, block, width, shortcut = ((3, 3, 3), Basic, 16, "zero_pad") if variant == "resnet20" else \
                ((1, 1), Basic, 4, "zero_pad")
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), _bn(width), nn.ReLU())
        else:
            stages, block, width, shortcut = (3, 4, 6, 3), Bottleneck, 64, "projection"
            self.stem = nn.Sequential(nn.Conv2d(3, width, 7, 2, 3, bias=False), _bn(width), nn.ReLU(),
                                      nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], width
        for s, n in enumerate(stages):
            for b in range(n):
                blocks.append(block(cin, width * 2**s, 2 if s > 0 and b == 0 else 1, shortcut))
                cin = width * 2**s * block.expansion
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class Attention(nn.Module):
    """jaxml's MultiHeadAttention: q/v projections with bias, k without, an output projection."""

    def __init__(self, width, heads, causal):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q, self.k, self.v = nn.Linear(width, width), nn.Linear(width, width, bias=False), nn.Linear(width, width)
        self.out = nn.Linear(width, width)

    def forward(self, x):
        b, l, d = x.shape
        split = lambda t: t.view(b, l, self.heads, d // self.heads).transpose(1, 2)
        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)),
                                           is_causal=self.causal)
        return self.out(y.transpose(1, 2).reshape(b, l, d))

class Block(nn.Module):
    """Pre-norm: x + attn(LN(x)), x + mlp(LN(x)), dropout on each residual branch."""

    def __init__(self, width, heads, mlp, dropout, causal):
        super().__init__()
        self.n1, self.attn = nn.LayerNorm(width, eps=1e-6), Attention(width, heads, causal)
        self.n2 = nn.LayerNorm(width, eps=1e-6)
        self.mlp_in, self.mlp_out = nn.Linear(width, mlp), nn.Linear(mlp, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x):
        x = x + self.drop(self.attn(self.n1(x)))
        h = self.drop(F.gelu(self.mlp_in(self.n2(x)), approximate="tanh"))
        return x + self.drop(self.mlp_out(h))


class ViT(nn.Module):
    def __init__(self, m, channels, side):
        super().__init__()
        self.p = m.patch_size
        n = (side // self.p) ** 2 + (1 if m.pool == "cls" else 0)
        self.embed = nn.Linear(self.p * self.p * channels, m.features)
        self.cls = nn.Parameter(torch.zeros(1, 1, m.features)) if m.pool == "cls" else None
        self.pos = nn.Parameter(torch.randn(1, n, m.features) * 0.02)
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.Sequential(*[Block(m.features, m.num_heads, m.mlp_dim, m.dropout, False)
                                      for _ in range(m.num_layers)])
        self.norm, self.head = nn.LayerNorm(m.features, eps=1e-6), nn.Linear(m.features, m.num_classes)

    def forward(self, x_BxCxHxW):
        b, c, h, w = x_BxCxHxW.shape
        p = self.p
        patches = x_BxCxHxW.permute(0, 2, 3, 1).reshape(b, h // p, p, w // p, p, c)
        patches = patches.permute(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
        x = self.embed(patches)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(b, -1, -1), x], 1)
        x = self.norm(self.blocks(self.drop(x + self.pos)))
        return self.head(x[:, 0] if self.cls is not None else x.mean(1))


class GPT(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.tok = nn.Embedding(m.vocab_size, m.features)
        self.pos = nn.Parameter(torch.randn(m.max_len, m.features) * 0.02)
        self.drop = nn.Dropout(m.dropout)
        self.blocks = nn.Sequential(*[Block(m.features, m.num_heads, m.mlp_dim, m.dropout, True)
                                      for _ in range(m.num_layers)])
        self.norm = nn.LayerNorm(m.features, eps=1e-6)

    def forward(self, tokens_BxL):
        x = self.drop(self.tok(tokens_BxL) + self.pos[: tokens_BxL.shape[1]])
        return self.norm(self.blocks(x)) @ self.tok.weight.T  # tied unembedding


class CharLSTM(nn.Module):
    def __init__(self, m):
        super().__init__()
        if m.cell != "lstm" or m.task != "lm":
            raise ValueError(f"the PyTorch twin is the LSTM LM, got cell={m.cell!r} task={m.task!r}")
        self.embed = nn.Embedding(256, m.embed)
        self.rnn = nn.LSTM(m.embed, m.hidden, m.num_layers, batch_first=True, dropout=m.dropout)
        self.drop, self.out = nn.Dropout(m.dropout), nn.Linear(m.hidden, 256)

    def forward(self, tokens_BxT):
        return self.out(self.drop(self.rnn(self.embed(tokens_BxT))[0]))


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb, groups, dropout):
        super().__init__()
        self.n1, self.c1 = nn.GroupNorm(groups, cin, eps=1e-6), nn.Conv2d(cin, cout, 3, padding=1)
        self.emb = nn.Linear(emb, cout)
        self.n2, self.c2 = nn.GroupNorm(groups, cout, eps=1e-6), nn.Conv2d(cout, cout, 3, padding=1)
        nn.init.zeros_(self.c2.weight)
        self.drop = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.c1(F.silu(self.n1(x))) + self.emb(F.silu(emb))[:, :, None, None]
        return self.skip(x) + self.c2(self.drop(F.silu(self.n2(h))))

class AttnBlock(nn.Module):
    def __init__(self, ch, heads):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(ch, eps=1e-6), Attention(ch, heads, False)

    def forward(self, x):
        b, c, h, w = x.shape
        y = x.flatten(2).transpose(1, 2)
        y = y + self.attn(self.norm(y))
        return y.transpose(1, 2).reshape(b, c, h, w)

class Resample(nn.Module):
    def __init__(self, ch, down):
        super().__init__()
        self.down = down
        self.conv = nn.Conv2d(ch, ch, 3, stride=2 if down else 1, padding=1)

    def forward(self, x):
        return self.conv(x if self.down else F.interpolate(x, scale_factor=2, mode="nearest"))

class UNet(nn.Module):
    def __init__(self, m, in_ch):
        super().__init__()
        base, emb, side, levels = m.channels, 4 * m.channels, m.image_size, len(m.channel_mults)
        self.base = base
        self.t_mlp = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cls = nn.Embedding(m.num_classes + 1, emb)
        res = lambda cin, cout: ResBlock(cin, cout, emb, m.groups, m.dropout)
        attn = lambda ch: AttnBlock(ch, m.num_heads)
        self.conv_in = nn.Conv2d(in_ch, base, 3, padding=1)
        skips, ch = [base], base
        self.down = nn.ModuleList()
        for level, mult in enumerate(m.channel_mults):
            for _ in range(m.num_res_blocks):
                blocks = [res(ch, base * mult)]
                ch = base * mult
                if side in m.attention_resolutions:
                    blocks.append(attn(ch))
                self.down.append(nn.ModuleList(blocks))
                skips.append(ch)
            if level < levels - 1:
                self.down.append(Resample(ch, down=True))
                skips.append(ch)
                side //= 2
        self.mid = nn.ModuleList([res(ch, ch), attn(ch), res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(m.channel_mults))):
            for _ in range(m.num_res_blocks + 1):
                blocks = [res(ch + skips.pop(), base * mult)]
                ch = base * mult
                if side in m.attention_resolutions:
                    blocks.append(attn(ch))
                self.up.append(nn.ModuleList(blocks))
            if level > 0:
                self.up.append(Resample(ch, down=False))
                side *= 2
        self.out = nn.Sequential(nn.GroupNorm(m.groups, ch, eps=1e-6), nn.SiLU(),
                                 nn.Conv2d(ch, in_ch, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)

    def forward(self, x, t, labels):
        half = self.base // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        emb = self.t_mlp(torch.cat([torch.cos(args), torch.sin(args)], -1)) + self.cls(labels)
        h = self.conv_in(x)
        hs = [h]
        for mod in self.down:
            h = mod(h) if isinstance(mod, Resample) else self._run_blocks(mod, h, emb)
            hs.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for mod in self.up:
            h = mod(h) if isinstance(mod, Resample) else self._run_blocks(mod, torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)

    @staticmethod
    def _run_blocks(blocks, h, emb):
        h = blocks[0](h, emb)
        for a in blocks[1:]:
            h = a(h)
        return h
