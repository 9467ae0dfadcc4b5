"""Regenerate the embedded tri-modal dataset in momoe/data/builtin/ (deterministic for a given seed,
scikit-learn and espeak-ng version, on a given machine).

Sources:
- images: the 1,797 8x8 handwritten digits bundled with scikit-learn (`sklearn.datasets.load_digits`,
  17 grey levels, scaled to [0, 1]);
- text: short descriptions of each digit from templates ("a handwritten seven", "the digit 7", ...);
- speech: those texts spoken by espeak-ng (`espeak-ng -w`, 22,050 Hz 16-bit mono) with a voice, speed
  and pitch drawn per document, leading and trailing silence trimmed. Real espeak-ng, no fallback
  synthesiser: the script stops with an install hint when espeak-ng is missing.

Each image gives DOCUMENTS_PER_IMAGE documents, each of a kind drawn at random: text->image,
image->text, text->speech, speech->text, or image+text+speech (the three in a random order). Images
are split 90/10 into train and validation before anything is trained; the image codebook (2x2
patches, 256 codes) and the speech units (log-mel K-means, 256 units, ~25 per second) are trained on
the train split only. Output: <out>/{train,validation,tokenizer}/ (see momoe.data.builtin).

Needs: `pip install '.[data]'` (scikit-learn, for this script only) and `apt-get install espeak-ng`.
Usage: python scripts/make_dataset.py [--out momoe/data/builtin] [--seed 0]
"""
import argparse
import os
import shutil
import subprocess
import tempfile
from typing import Dict, List, Tuple

import numpy as np
import torch

from momoe.data.builtin import BUILTIN_DIR, SPLITS, TOKENIZER_DIR
from momoe.data.format import TokenDataset, TokenDatasetWriter
from momoe.data.tokenizers import ByteTokenizer, MultimodalTokenizer, PatchTokenizer, SpeechTokenizer, read_wav

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTIONS = (
    "a handwritten {word}",
    "the digit {digit}",
    "a picture of the number {word}",
    "{word}, written by hand",
    "an eight by eight image of a {word}",
    "this is a {word}",
    "someone wrote the number {word}",
    "a small grey {word}",
)
KINDS = ("text-image", "image-text", "text-speech", "speech-text", "image-text-speech")
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-029", "en-gb-x-rp", "en-us+f3", "en-gb+m3", "en+f2")
SPEEDS = (150, 200)  # words per minute, drawn uniformly
PITCHES = (30, 70)  # espeak-ng pitch 0..99, drawn uniformly
DOCUMENTS_PER_IMAGE = 3
VALIDATION_FRACTION = 0.1
SAMPLE_RATE = 22050
SILENCE = 0.01  # amplitude below which leading/trailing samples are trimmed
IMAGE_CODES, PATCH_SIZE = 256, 2
SPEECH_UNITS = 256


def espeak_version() -> str:
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng is not installed: apt-get install -y espeak-ng (Debian/Ubuntu)")
    out = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True, check=True).stdout
    return out.split("Data at")[0].strip()  # e.g. "eSpeak NG text-to-speech: 1.51"


def synthesise(text: str, voice: str, speed: int, pitch: int, folder: str) -> torch.Tensor:
    """espeak-ng speech of `text` as a waveform `[S]` at SAMPLE_RATE, silence trimmed at both ends."""
    path = os.path.join(folder, "speech.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text], check=True)
    waveform, rate = read_wav(path)
    if rate != SAMPLE_RATE:
        raise SystemExit(f"espeak-ng voice {voice} wrote {rate} Hz, expected {SAMPLE_RATE}")
    loud = (waveform.abs() > SILENCE).nonzero()[:, 0]
    return waveform[int(loud[0]):int(loud[-1]) + 1]


def plan_documents(labels: np.ndarray, rng: np.random.Generator) -> List[Dict]:
    """DOCUMENTS_PER_IMAGE document plans per image: kind, caption, span order and voice settings."""
    plans = []
    for image, label in enumerate(labels):
        for _ in range(DOCUMENTS_PER_IMAGE):
            kind = KINDS[rng.integers(len(KINDS))]
            caption = CAPTIONS[rng.integers(len(CAPTIONS))].format(word=DIGIT_WORDS[label], digit=label)
            order = kind.split("-")
            if kind == "image-text-speech":
                order = [order[i] for i in rng.permutation(3)]
            plans.append({"image": image, "kind": kind, "caption": caption, "order": order,
                          "voice": VOICES[rng.integers(len(VOICES))], "speed": int(rng.integers(*SPEEDS)),
                          "pitch": int(rng.integers(*PITCHES))})
    return plans


def speech_key(plan: Dict) -> Tuple:
    return plan["caption"], plan["voice"], plan["speed"], plan["pitch"]


def document(plan: Dict, images: torch.Tensor, speech: Dict[Tuple, torch.Tensor]) -> List[Tuple[str, object]]:
    payloads = {"text": plan["caption"], "image": images[plan["image"]], "speech": speech.get(speech_key(plan))}
    return [(modality, payloads[modality]) for modality in plan["order"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=BUILTIN_DIR, help="dataset root to (over)write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    from sklearn.datasets import load_digits  # the script's own dependency (pip install '.[data]')

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    version = espeak_version()
    digits = load_digits()
    images = torch.from_numpy(digits.images).float() / 16
    order = rng.permutation(len(images))
    n_val = int(round(VALIDATION_FRACTION * len(images)))
    split_of = np.empty(len(images), dtype=object)
    split_of[order[:n_val]], split_of[order[n_val:]] = "validation", "train"

    plans = plan_documents(digits.target, rng)
    speech: Dict[Tuple, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as folder:
        for plan in plans:
            if "speech" in plan["order"] and speech_key(plan) not in speech:
                speech[speech_key(plan)] = synthesise(*speech_key(plan), folder)
    print(f"{len(plans)} documents, {len(speech)} utterances ({version})")

    train_images = images[torch.from_numpy(np.flatnonzero(split_of == "train"))]
    train_speech = list({speech_key(p): speech[speech_key(p)] for p in plans
                         if split_of[p["image"]] == "train" and "speech" in p["order"]}.values())
    image_tok = PatchTokenizer.train(train_images, PATCH_SIZE, IMAGE_CODES, seed=args.seed)
    speech_tok = SpeechTokenizer.train(train_speech, SAMPLE_RATE, SPEECH_UNITS, seed=args.seed)
    tokenizer = MultimodalTokenizer([ByteTokenizer(), image_tok, speech_tok])
    tokenizer.save(os.path.join(args.out, TOKENIZER_DIR))
    print("\n".join(tokenizer.vocab.describe()))

    for split in SPLITS:
        chosen = [p for p in plans if split_of[p["image"]] == split]
        kinds = {kind: sum(p["kind"] == kind for p in chosen) for kind in KINDS}
        metadata = {
            "name": "momoe builtin: digits, descriptions, speech", "split": split, "seed": args.seed,
            "script": "scripts/make_dataset.py", "documents_per_kind": kinds,
            "images": "scikit-learn load_digits: 8x8 handwritten digits (UCI optdigits), grey levels 0..16 / 16",
            "text": "templated descriptions of each image's digit, UTF-8 bytes",
            "speech": f"the text spoken by espeak-ng ({version}); voice, speed and pitch drawn per document",
            "image_tokenizer": f"{PATCH_SIZE}x{PATCH_SIZE} patches, K-means codebook of {IMAGE_CODES} (train split)",
            "speech_tokenizer": f"log-mel K-means units, {SPEECH_UNITS} units (train split), "
                                f"{SAMPLE_RATE / speech_tok.hop_length / speech_tok.frames_per_unit:.1f} per second",
        }
        with TokenDatasetWriter(os.path.join(args.out, split), tokenizer.vocab, metadata) as writer:
            for plan in chosen:
                writer.add(*tokenizer.encode(document(plan, images, speech)))
        dataset = TokenDataset(os.path.join(args.out, split))
        size = sum(os.path.getsize(os.path.join(dataset.path, f)) for f in os.listdir(dataset.path))
        print(f"{split}: {len(dataset)} documents, {dataset.num_tokens} tokens {dataset.tokens_per_modality()}, "
              f"{size / 1e6:.2f} MB, kinds {kinds}")

    val = images[torch.from_numpy(np.flatnonzero(split_of == "validation"))]
    recon = torch.stack([image_tok.decode(image_tok.encode(x)) for x in val])
    print(f"image codebook: validation mean |error| {float((recon - val).abs().mean()):.4f} (pixels in [0, 1])")


if __name__ == "__main__":
    main()
