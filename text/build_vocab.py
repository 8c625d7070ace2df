"""Rebuild the CLIP BPE vocabulary (vocab.json, merges.txt) from the public merges file.

The OpenAI CLIP tokenizer is defined by `bpe_simple_vocab_16e6.txt.gz`, which open_clip_torch
ships. transformers' CLIPTokenizer needs it as vocab.json + merges.txt. We build those files
once and bundle them in weights/clip_tokenizer, so loading never needs a model hub.

    pip install --no-deps open_clip_torch && python -m sdlens.text.build_vocab
"""
import gzip
import importlib.util
import json
import os
import sys


def bytes_to_unicode():
    # GPT-2/CLIP byte-level BPE: printable bytes map to themselves, the rest to 256+n.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def build(bpe_gz, out_dir):
    lines = gzip.open(bpe_gz).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]  # = lines[1:48895]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
               "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=1)
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77,
                   "do_lower_case": True, **special}, f, indent=1)


if __name__ == "__main__":
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        sys.exit("error: open_clip_torch is not installed; run `pip install --no-deps open_clip_torch`")
    src = os.path.join(spec.submodule_search_locations[0], "bpe_simple_vocab_16e6.txt.gz")
    out = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "weights", "clip_tokenizer")
    build(src, out)
    print(f"wrote {out}")
