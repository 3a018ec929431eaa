"""The published checkpoint's weights: shard discovery, strict key check, conversion to the port.

The published layout is read as it is: `model.safetensors`, or the shards named by
`model.safetensors.index.json` (its "weight_map"). Before any tensor is read, every key is
checked against the shapes the config implies (`published_shapes`) and every missing,
unexpected or mis-shaped key is reported by name in one error, with the file it lives in.
`to_port_state` then maps the published names onto the port's modules (att_proj split into
q/k/v, the per-expert matrices packed like transformers' OLMoE experts, the two embedding tables
joined).
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from envs.backends.molmoe.config import CONFIG_FILE, PREPROCESSOR_FILE, TOKENIZER_FILE, MolmoEConfig, molmoe_1b_config

WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
LLM = "model.transformer."
VISION = "model.vision_backbone."


def published_shapes(cfg: MolmoEConfig) -> dict[str, tuple[int, ...]]:
    """Every state-dict key of the published MolmoE checkpoint with its shape."""
    d, hidden, experts = cfg.d_model, cfg.expert_hidden_size, cfg.moe_num_experts
    vd, vf, vm = cfg.image_emb_dim, cfg.vision_feature_dim, cfg.image_mlp_dim
    heads = cfg.image_num_heads * cfg.image_head_dim
    kv = cfg.image_num_key_value_heads * cfg.image_head_dim
    shapes = {
        f"{LLM}wte.embedding": (cfg.embedding_size, d),
        f"{LLM}ln_f.weight": (d,),
        "lm_head.weight": (cfg.embedding_size, d),
    }
    if cfg.additional_vocab_size:
        shapes[f"{LLM}wte.new_embedding"] = (cfg.additional_vocab_size, d)
    for n in range(cfg.n_layers):
        b = f"{LLM}blocks.{n}."
        shapes.update({
            f"{b}attn.q_norm.weight": (d,),
            f"{b}attn.k_norm.weight": (d,),
            f"{b}attn.att_proj.weight": (3 * d, d),
            f"{b}attn.attn_out.weight": (d, d),
            f"{b}attn.attn_norm.weight": (d,),
            f"{b}mlp.gate.weight": (experts, d),
            f"{b}mlp.ff_norm.weight": (d,),
        })
        for e in range(experts):
            shapes.update({
                f"{b}mlp.experts.{e}.gate_proj.weight": (hidden, d),
                f"{b}mlp.experts.{e}.up_proj.weight": (hidden, d),
                f"{b}mlp.experts.{e}.down_proj.weight": (d, hidden),
            })
    v = VISION
    shapes.update({
        f"{v}pad_embed": (2, vf),
        f"{v}image_pooling_2d.wq.weight": (heads, vf), f"{v}image_pooling_2d.wq.bias": (heads,),
        f"{v}image_pooling_2d.wk.weight": (kv, vf), f"{v}image_pooling_2d.wk.bias": (kv,),
        f"{v}image_pooling_2d.wv.weight": (kv, vf), f"{v}image_pooling_2d.wv.bias": (kv,),
        f"{v}image_pooling_2d.wo.weight": (vd, heads), f"{v}image_pooling_2d.wo.bias": (vd,),
        f"{v}image_projector.w1.weight": (hidden, vd),
        f"{v}image_projector.w2.weight": (d, hidden),
        f"{v}image_projector.w3.weight": (hidden, vd),
        f"{v}image_vit.class_embedding": (vd,),
        f"{v}image_vit.positional_embedding": (cfg.image_num_pos, vd),
        f"{v}image_vit.patch_embedding.weight": (vd, cfg.image_patch_size ** 2 * 3),
        f"{v}image_vit.pre_ln.weight": (vd,),
        f"{v}image_vit.pre_ln.bias": (vd,),
    })
    for n in range(cfg.image_num_layers):
        r = f"{v}image_vit.transformer.resblocks.{n}."
        for name, shape in (("wq", (heads, vd)), ("wk", (kv, vd)), ("wv", (kv, vd)), ("wo", (vd, heads))):
            shapes[f"{r}attention.{name}.weight"] = shape
            shapes[f"{r}attention.{name}.bias"] = shape[:1]
        shapes.update({
            f"{r}feed_forward.w1.weight": (vm, vd), f"{r}feed_forward.w1.bias": (vm,),
            f"{r}feed_forward.w2.weight": (vd, vm), f"{r}feed_forward.w2.bias": (vd,),
            f"{r}attention_norm.weight": (vd,), f"{r}attention_norm.bias": (vd,),
            f"{r}ffn_norm.weight": (vd,), f"{r}ffn_norm.bias": (vd,),
        })
    return shapes


def weight_files(model_dir: Path) -> dict[str, Path]:
    """{key: file holding it}, from the index's weight_map or the single model.safetensors."""
    index = model_dir / INDEX_FILE
    single = model_dir / WEIGHTS_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map")
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            raise ValueError(f"weights index {index} is not a valid JSON object: {err}") from None
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError(f"weights index {index}: field 'weight_map' is missing or empty")
        files = {key: model_dir / name for key, name in weight_map.items()}
        for key, path in sorted(files.items()):
            if not path.is_file():
                raise FileNotFoundError(f"weights shard {path} (named by {index} for key {key!r}) does not exist")
        return files
    if single.is_file():
        return {key: single for key in _keys_of(single)}
    others = sorted(p.name for p in model_dir.glob("*.safetensors")) + sorted(p.name for p in model_dir.glob("*.bin"))
    raise FileNotFoundError(
        f"{model_dir}: no weights: expected {WEIGHTS_FILE} or {INDEX_FILE} with its shards"
        + (f" (found {others}: sharded weights need their index file)" if others else "")
    )


def _keys_of(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError) as err:
        raise ValueError(f"weights file {path} cannot be read: {err}") from None


def check_weights(cfg: MolmoEConfig, files: dict[str, Path]) -> None:
    """Every missing, unexpected and mis-shaped key by name (shapes from the file headers only)."""
    expected = published_shapes(cfg)
    found: dict[str, tuple[tuple[int, ...], Path]] = {}
    for path in sorted(set(files.values())):
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    found[key] = (tuple(f.get_slice(key).get_shape()), path)
        except (SafetensorError, OSError) as err:
            raise ValueError(f"weights file {path} cannot be read: {err}") from None
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(f"{k} (in {found[k][1].name})" for k in set(found) - set(expected))
    misshaped = sorted(
        f"{k}: {list(found[k][0])} in {found[k][1].name}, expected {list(expected[k])}"
        for k in set(expected) & set(found) if found[k][0] != expected[k]
    )
    lost = sorted(f"{k} (index names {files[k].name})" for k in set(files) if k not in found)
    if missing or unexpected or misshaped or lost:
        parts = [f"{title} ({len(items)}): {items}" for title, items in (
            ("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped keys", misshaped),
            ("keys of the index absent from their shard", lost)) if items]
        raise ValueError(f"{cfg.source}: the weights do not match the config; " + "; ".join(parts))


def read_weights(files: dict[str, Path], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                state[key] = f.get_tensor(key).to(dtype)
    return state


def to_port_state(cfg: MolmoEConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Published names -> the port's module names (envs.backends.molmoe.model.MolmoE).

    Consumes `state` (each published tensor is dropped once converted), so the host holds the
    weights about once, plus one block's packed experts, instead of twice.
    """
    d = cfg.d_model
    take = state.pop
    embedding = take(f"{LLM}wte.embedding")
    extra = take(f"{LLM}wte.new_embedding", embedding[:0])
    out = {"wte.weight": torch.cat([embedding, extra]), "ln_f.weight": take(f"{LLM}ln_f.weight"),
           "lm_head.weight": take("lm_head.weight")}
    del embedding, extra
    for n in range(cfg.n_layers):
        b, o = f"{LLM}blocks.{n}.", f"layers.{n}."
        q, k, v = take(f"{b}attn.att_proj.weight").split([d, d, d])
        out.update({
            f"{o}self_attn.q_proj.weight": q, f"{o}self_attn.k_proj.weight": k, f"{o}self_attn.v_proj.weight": v,
            f"{o}self_attn.o_proj.weight": take(f"{b}attn.attn_out.weight"),
            f"{o}self_attn.q_norm.weight": take(f"{b}attn.q_norm.weight"),
            f"{o}self_attn.k_norm.weight": take(f"{b}attn.k_norm.weight"),
            f"{o}input_layernorm.weight": take(f"{b}attn.attn_norm.weight"),
            f"{o}post_attention_layernorm.weight": take(f"{b}mlp.ff_norm.weight"),
            f"{o}mlp.gate.weight": take(f"{b}mlp.gate.weight"),
        })
        experts = range(cfg.moe_num_experts)
        e = f"{b}mlp.experts."
        out[f"{o}mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([take(f"{e}{i}.gate_proj.weight"), take(f"{e}{i}.up_proj.weight")]) for i in experts])
        out[f"{o}mlp.experts.down_proj"] = torch.stack([take(f"{e}{i}.down_proj.weight") for i in experts])
    out.update({f"vision.{k[len(VISION):]}": state.pop(k) for k in [k for k in state if k.startswith(VISION)]})
    return out


def write_random_checkpoint(cfg: MolmoEConfig, out_dir: str | Path, seed: int = 0, dtype: torch.dtype = torch.bfloat16,
                            device: str = "cpu", shard_bytes: int = 4 << 30) -> Path:
    """Random weights in the published layout (sharded with an index when over `shard_bytes`).

    Norm weights 1, biases 0, the rest N(0, 0.02): the size and layout of the real checkpoint,
    for latency measurements where the real weights are not available. One shard is in memory
    at a time.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in published_shapes(cfg).items():
        nbytes = math.prod(shape) * itemsize
        if size and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    generator = torch.Generator(device=device).manual_seed(seed)

    def tensor(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key.endswith(("norm.weight", "ln.weight", "ln_f.weight")):
            return torch.ones(shape, dtype=dtype)
        if key.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        return (torch.randn(shape, generator=generator, device=device) * 0.02).to("cpu", dtype)

    names = [WEIGHTS_FILE] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        save_file({key: tensor(key, shape) for key, shape in shard}, str(out_dir / name), metadata={"format": "pt"})
    if len(shards) > 1:
        weight_map = {key: name for name, shard in zip(names, shards) for key, _ in shard}
        (out_dir / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1) + "\n")
    return out_dir


# What a random checkpoint takes from its template beside config.json (tokenizer and processor).
TEMPLATE_FILES = (PREPROCESSOR_FILE, TOKENIZER_FILE, "generation_config.json", "tokenizer_config.json",
                  "special_tokens_map.json")


def build_random_checkpoint(model_dir: str | Path, template_dir: str | Path, device: str = "cpu",
                            full_size: bool = True, seed: int = 0) -> Path:
    """A random-weight checkpoint directory in the published layout: the template's config.json
    (with MolmoE-1B's published sizes, config.MOLMOE_1B_SIZES, unless full_size=False), its
    tokenizer and processor files (e.g. the reference fixture's, which are the real ones), and
    random weights (write_random_checkpoint; 14.4 GB in bfloat16 at full size). For latency
    measurements of the real model's shapes where its weights are not available."""
    model_dir, template_dir = Path(model_dir), Path(template_dir)
    template = json.loads((template_dir / CONFIG_FILE).read_text())
    model_dir.mkdir(parents=True, exist_ok=True)
    data = molmoe_1b_config(template) if full_size else template
    (model_dir / CONFIG_FILE).write_text(json.dumps(data, indent=2) + "\n")
    for name in TEMPLATE_FILES:
        if (template_dir / name).is_file():
            shutil.copy(template_dir / name, model_dir / name)
    return write_random_checkpoint(MolmoEConfig.load(model_dir), model_dir, seed=seed, device=device)
