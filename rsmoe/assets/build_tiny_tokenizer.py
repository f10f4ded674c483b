"""Dev tool: (re)build the committed tiny tokenizer in ``rsmoe/assets/tiny_tokenizer/``.

It is trained on real remote-sensing caption and VQA text (UCM-captions and RSVQA samples) plus a few
RSICap-style sentences, so random-weight test presets see realistic token statistics with a vocabulary
small enough that embedding tables stay tiny. Not run at install time; the output is committed.

    python -m rsmoe.assets.build_tiny_tokenizer --data /work/shared/data
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_OUT = Path(__file__).resolve().parent / "tiny_tokenizer"
VOCAB_SIZE = 1500
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>"]

# RSICap-style captions (theme → objects → relations) and instructions, so the router's prompts and
# the three-part targets tokenise into common pieces instead of byte fallbacks.
EXTRA_TEXT = [
    "This is a high-resolution aerial image of a dense residential area.",
    "There are many red-roofed houses, several green trees and a few cars parked along the road.",
    "A river runs from the top left to the bottom right, and a bridge crosses it in the middle.",
    "The image shows an airport with two runways, a terminal building and several airplanes.",
    "A large farmland occupies most of the scene, divided into rectangular fields.",
    "Some storage tanks are located to the left of the industrial buildings.",
    "A harbor with many boats docked next to the pier is in the lower part of the image.",
    "A baseball field is surrounded by a parking lot and a few trees.",
    "Describe the image in detail.",
    "Describe the overall scene and theme of this remote sensing image.",
    "List the objects in the image and their numbers, colours and sizes.",
    "Describe the spatial relations between the objects in the image.",
    "Answer the question about the remote sensing image with a short answer.",
    "Question: How many buildings are there? Answer: 12",
    "Is it a rural or an urban area? urban",
]


def iter_text(data_root: Path) -> Iterator[str]:
    """Caption sentences, VQA questions and answers found under ``data_root``."""
    captions = data_root / "ucm_captions_sample" / "captions.json"
    if captions.is_file():
        for image in json.loads(captions.read_text())["images"]:
            for sentence in image["sentences"]:
                yield sentence["raw"]
    for questions in sorted((data_root / "rsvqa_website_sample").glob("*/*questions*.json")):
        for q in json.loads(questions.read_text())["questions"]:
            yield q["question"]
    for answers in sorted((data_root / "rsvqa_website_sample").glob("*/*answers*.json")):
        # Answers repeat a lot (yes/no/counts); one copy of each is enough to get them into the vocab.
        yield " ".join(sorted({a["answer"] for a in json.loads(answers.read_text())["answers"]}))
    yield from EXTRA_TEXT


def build(data_root: Path, out_dir: Path = DEFAULT_OUT, vocab_size: int = VOCAB_SIZE) -> Path:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    texts = list(iter_text(data_root))
    if len(texts) <= len(EXTRA_TEXT):
        raise FileNotFoundError(f"no caption/VQA text found under {data_root}")
    logger.info("training a %d-token BPE on %d texts", vocab_size, len(texts))

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    # Lowercasing keeps the vocabulary small; captions are case-insensitive for scoring anyway.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text encodes, no <unk> needed
        min_frequency=1,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=2048,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out_dir)
    # Keep only what AutoTokenizer needs, and pin "no BOS" / a class name 4.x and 5.x both know.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg = {k: v for k, v in cfg.items() if k not in ("backend", "is_local", "local_files_only")}
    cfg.update(tokenizer_class="PreTrainedTokenizerFast", add_bos_token=False, add_eos_token=False)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        (out_dir / extra).unlink(missing_ok=True)
    logger.info("wrote %s (vocab %d)", out_dir, tok.get_vocab_size())
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data"), help="folder with the samples")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    build(args.data, args.out, args.vocab_size)


if __name__ == "__main__":
    main()
