"""The example model in the containers real catalogs hold, written by the field's own writers:
GGUF (the `gguf` writer and its quantizers), ONNX (`torch.onnx.export`), a Hugging Face folder
(sharded safetensors and index by `huggingface_hub`, configs, tokenizer files) and a diffusers
folder (`save_pretrained`). Test and bench material; nothing is downloaded."""
from __future__ import annotations

import json
import logging
import os
import warnings

import numpy as np
import torch

from haagenti.errors import FormatError
from haagenti.examples import DigitsTransformer
from haagenti.extras import require


def load_example(path: str) -> DigitsTransformer:
    """The example transformer with the weights of a safetensors file of it (fp32 in memory);
    its width and depth are read from the weights."""
    from safetensors.torch import load_file

    state = load_file(path)
    if "embed.weight" not in state:
        raise FormatError(f"{path}: not a haagenti example model (no embed.weight)")
    model = DigitsTransformer(state["embed.weight"].shape[0], sum(1 for k in state if k.endswith("q_proj.weight")))
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        raise FormatError(f"{path}: not a haagenti example model ({str(e).splitlines()[0]})") from None
    return model.eval()


def export_all(path: str, out_dir: str) -> list[str]:
    """A safetensors file of the example model as GGUF F16 and Q8_0, ONNX, a Hugging Face
    folder of 4+ shards and a diffusers folder, in `out_dir`; returns what was written."""
    name = os.path.basename(path).removesuffix(".safetensors")
    model = load_example(path)
    f32 = state_of(model, torch.float32)
    out = [os.path.join(out_dir, f"{name}-{q}.gguf") for q in ("F16", "Q8_0")]
    for q, p in zip(("F16", "Q8_0"), out):
        export_gguf(f32, p, q)
    out.append(os.path.join(out_dir, f"{name}.onnx"))
    export_onnx(model, out[-1])
    out.append(os.path.join(out_dir, "hf"))
    save_hf_folder(state_of(model, torch.bfloat16), out[-1], shards=4)
    out.append(os.path.join(out_dir, "diffusers"))
    save_diffusers_folder(state_of(model, torch.bfloat16), out[-1])
    return out


# A quantization ladder as llama.cpp makes one: the F16 GGUF, then each type quantized from
# those F16 values (llama-quantize's input), here with gguf's ports of the reference quantizers.
LADDER = ("F16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")


def export_ladder(path: str, out_dir: str) -> list[str]:
    """A safetensors file of the example model as the GGUF files of LADDER, in `out_dir`
    (`<name>-<type>.gguf`); returns them in LADDER's order."""
    name = os.path.basename(path).removesuffix(".safetensors")
    state = state_of(load_example(path), torch.float16)
    out = [os.path.join(out_dir, f"{name}-{q}.gguf") for q in LADDER]
    for q, p in zip(LADDER, out):
        export_gguf(state, p, q)
    return out


# ONNX int8 and uint8 weights as onnxruntime's dynamic quantization writes them (per tensor, and
# per channel: one scale and zero point per output column of a MatMul weight; the graph's other
# initializers kept in fp32), each of the fp32 ONNX export: suffix -> (weight type, per channel).
ONNX_LADDER = {"int8": ("QInt8", False), "uint8": ("QUInt8", False), "int8ch": ("QInt8", True), "uint8ch": ("QUInt8", True)}


def export_onnx_ladder(path: str, out_dir: str) -> list[str]:
    """A safetensors file of the example model as its fp32 ONNX export (`<name>.onnx`) and that
    file through onnxruntime's `quantize_dynamic` (`<name>-int8.onnx`, `<name>-uint8.onnx`, per
    channel `<name>-int8ch.onnx`, `<name>-uint8ch.onnx`), in `out_dir`; returns them in that order.
    Needs onnxruntime (haagenti's dev extra)."""
    try:
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError:
        raise FormatError("ONNX quantization needs onnxruntime: pip install onnxruntime") from None
    name = os.path.basename(path).removesuffix(".safetensors")
    os.makedirs(out_dir, exist_ok=True)
    out = [os.path.join(out_dir, f"{name}.onnx")]
    export_onnx(load_example(path), out[0])
    quant_log = logging.getLogger()  # quantize_dynamic logs a hint about pre-processing on the root logger
    level = quant_log.level
    quant_log.setLevel(logging.ERROR)
    try:
        for suffix, (weight_type, per_channel) in ONNX_LADDER.items():
            out.append(os.path.join(out_dir, f"{name}-{suffix}.onnx"))
            quantize_dynamic(out[0], out[-1], weight_type=QuantType[weight_type], per_channel=per_channel)
    finally:
        quant_log.setLevel(level)
    return out


def state_of(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.detach().to(dtype).contiguous() for k, v in model.state_dict().items()}


def export_gguf(state: dict[str, torch.Tensor], path: str, qtype: str = "F16", split_max_tensors: int = 0) -> list[str]:
    """Write `state` as GGUF with the gguf writer; quantized types (Q8_0, ...) quantize matrices
    whose rows fill whole blocks and keep the rest F32, as llama.cpp's converters do. Returns
    the files written (several with `split_max_tensors`)."""
    import gguf
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    qt = GGMLQuantizationType[qtype]
    block = GGML_QUANT_SIZES[qt][0]
    w = gguf.GGUFWriter(path, arch="digits", split_max_tensors=split_max_tensors)
    w.add_name("digits-transformer")
    w.add_description("haagenti example model")
    w.add_uint32("digits.block_count", sum(1 for k in state if k.endswith("q_proj.weight")))
    w.add_array("digits.labels", [str(i) for i in range(10)])
    for name, t in state.items():
        a = t.float().numpy()
        if qtype == "F32" or (block > 1 and (a.ndim < 2 or a.shape[-1] % block)):
            w.add_tensor(name, a)
        elif qtype == "F16":
            w.add_tensor(name, t.to(torch.float16).numpy())
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    paths = [str(p) for p in w.print_plan()] if split_max_tensors else [path]
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return paths


def export_onnx(model: torch.nn.Module, path: str, external_data: bool = False) -> None:
    """`torch.onnx.export` (the torch.export-based exporter) of the fp32 model; with
    `external_data` the initializers go to `<name>.data` next to it."""
    # torch's exporter logs a warning per torchvision op it cannot register and torch.export a
    # FutureWarning of its own: noise about torch's insides, not about the user's model.
    onnx_log = logging.getLogger("torch.onnx")
    level = onnx_log.level
    onnx_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            torch.onnx.export(model.float().eval(), (torch.zeros(1, 64),), path, dynamo=True, external_data=external_data, verbose=False)
    finally:
        onnx_log.setLevel(level)


def save_hf_folder(state: dict[str, torch.Tensor], folder: str, shards: int = 4) -> None:
    """A Hugging Face model folder: `huggingface_hub` shards the weights (with
    model.safetensors.index.json when there is more than one), plus config and tokenizer files."""
    from huggingface_hub import save_torch_state_dict

    os.makedirs(folder, exist_ok=True)
    total = sum(t.numel() * t.element_size() for t in state.values())
    save_torch_state_dict(state, folder, max_shard_size=total // shards + 1 if shards > 1 else total * 2)
    _json(folder, "config.json", {"architectures": ["DigitsTransformer"], "model_type": "digits", "hidden_size": state["embed.weight"].shape[0]})
    _json(folder, "generation_config.json", {"max_length": 8})
    vocab = {f"row{i}": i for i in range(256)}
    _json(folder, "tokenizer.json", {"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "row0"}})
    _json(folder, "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 8})
    _json(folder, "special_tokens_map.json", {"unk_token": "row0"})


def save_diffusers_folder(text_encoder: dict[str, torch.Tensor], folder: str, seed: int = 0) -> None:
    """A diffusers folder written by diffusers: a small UNet and VAE (`save_pretrained`), the
    scheduler config and model_index.json, with the example transformer as text_encoder/."""
    require("adaptive")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DModel
    from huggingface_hub import save_torch_state_dict

    torch.manual_seed(seed)
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    DDPMScheduler(num_train_timesteps=100).save_pretrained(os.path.join(folder, "scheduler"))
    _json(os.path.join(folder, "text_encoder"), "config.json", {"model_type": "digits"})
    save_torch_state_dict(text_encoder, os.path.join(folder, "text_encoder"))
    _json(folder, "model_index.json", {
        "_class_name": "DigitsDiffusionPipeline", "_diffusers_version": "0.42.1", "unet": ["diffusers", "UNet2DModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDPMScheduler"], "text_encoder": ["haagenti", "DigitsTransformer"],
    })


def _json(folder: str, name: str, doc: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "w") as f:
        json.dump(doc, f, indent=2)


def quantized_blocks(path: str) -> dict[str, tuple[str, np.ndarray]]:
    """Each tensor of a GGUF file as (type name, raw bytes), through gguf's own reader."""
    import gguf

    r = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.asarray(t.data).view(np.uint8).reshape(-1)) for t in r.tensors}
