"""Continuing a mixed-modal prompt: sampling constrained to well-formed documents, and writing the
result as text, PNG images and WAV speech.

The constraint (`SpanGrammar`): outside spans the next token is a text byte, <eos>, or the begin
marker of another modality; inside an image span only image codes until the image is complete, then
its end marker; inside a speech span speech units or its end marker (at most `max_span` units). So
every continuation decodes, whatever the model's quality.

Shape legend: T tokens, V the model's vocabulary size.
"""
import dataclasses
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from momoe.data import MultimodalTokenizer, Vocabulary, read_wav, write_wav
from momoe.data.vocab import TEXT
from momoe.models.modeling_utils import PreTrainedModel
from momoe.train.png import read_png, write_png

IMAGE_SCALE = 16  # generated 8x8 images are written as 128x128 pixels


@dataclasses.dataclass
class Span:
    """One span of a document: its modality and the positions [start, stop) of its payload ids."""

    modality: str
    start: int
    stop: int


@dataclasses.dataclass
class GrammarState:
    """Where a document stands: inside an open span of `modality` (None: between spans) holding
    `count` payload ids so far; done after <eos>."""

    modality: Optional[str] = None
    count: int = 0
    done: bool = False


class SpanGrammar:
    """Allowed next ids for documents of `vocab` (see the module docstring).

    Args:
        vocab (Vocabulary); vocab_size (int): the model's logits width V (>= vocab.size);
        span_lengths: {modality: payload ids per span} for fixed-size spans (images), others free;
        max_span (int): the most payload ids of a free span.
    """

    def __init__(self, vocab: Vocabulary, vocab_size: int, span_lengths: Dict[str, int], max_span: int = 256) -> None:
        self.vocab = vocab
        self.span_lengths = dict(span_lengths)
        self.max_span = max_span

        def mask(ids: Sequence[int]) -> torch.Tensor:
            m = torch.zeros(vocab_size, dtype=torch.bool)
            m[torch.tensor(list(ids), dtype=torch.long)] = True
            return m

        text = vocab.modality(TEXT)
        spans = [m for m in vocab.modalities if m.begin is not None]
        self.between = mask([*range(text.payload_start, text.payload_start + text.payload_size), vocab.eos,
                             *(m.begin for m in spans)])
        self.payload = {m.name: mask(range(m.payload_start, m.payload_start + m.payload_size)) for m in spans}
        self.end = {m.name: mask([m.end]) for m in spans}
        self.by_begin = {m.begin: m.name for m in spans}
        self.by_end = {m.end: m.name for m in spans}

    def allowed(self, state: GrammarState) -> torch.Tensor:
        """`[V]` bool: the ids that may come next."""
        if state.modality is None:
            return self.between
        limit = self.span_lengths.get(state.modality, self.max_span)
        if state.count >= limit:
            return self.end[state.modality]
        if state.count == 0 or state.modality in self.span_lengths:
            return self.payload[state.modality]
        return self.payload[state.modality] | self.end[state.modality]

    def advance(self, state: GrammarState, token: int) -> GrammarState:
        """The state after `token` (ValueError when the grammar does not allow it)."""
        if state.done or not bool(self.allowed(state)[token]):
            raise ValueError(f"momoe: token {token} cannot follow a document in state {state}")
        if state.modality is not None:
            ended = token == self.vocab.modality(state.modality).end
            return GrammarState() if ended else GrammarState(state.modality, state.count + 1)
        if token == self.vocab.eos:
            return GrammarState(done=True)
        return GrammarState(self.by_begin[token]) if token in self.by_begin else GrammarState()

    def start(self, prompt: Sequence[int]) -> GrammarState:
        """The state after a prompt (<bos> first); a prompt that breaks the grammar raises ValueError."""
        if not prompt or prompt[0] != self.vocab.bos:
            raise ValueError("momoe: a prompt starts with <bos>")
        state = GrammarState()
        for token in prompt[1:]:
            state = self.advance(state, token)
        if state.done:
            raise ValueError("momoe: the prompt already ends its document (<eos>)")
        return state


def span_lengths(tokenizer: MultimodalTokenizer) -> Dict[str, int]:
    """Fixed payload lengths: every image has codes_per_image codes."""
    return {name: tok.codes_per_image for name, tok in tokenizer.tokenizers.items() if hasattr(tok, "codes_per_image")}


def sample(logits: torch.Tensor, temperature: float, top_k: int, generator: Optional[torch.Generator]) -> int:
    """One id from logits `[V]` (-inf where not allowed): greedy at temperature 0, else softmax sampling
    over the top_k largest (0: all)."""
    if temperature <= 0:
        return int(logits.argmax())
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def continue_document(model: PreTrainedModel, tokenizer: MultimodalTokenizer, prompt: torch.Tensor,
                      max_new_tokens: int = 256, temperature: float = 0.8, top_k: int = 0,
                      generator: Optional[torch.Generator] = None, max_span: int = 256) -> torch.Tensor:
    """Continue prompt ids `[T]` (a document start: <bos> spans ..., possibly inside an open span) until
    <eos> or max_new_tokens new ids. Returns the prompt and its continuation `[T + n]`.

    Decoding runs with the model's cache (prefill, then one step per token); learned routing decides
    token by token (causal routing)."""
    vocab = tokenizer.vocab
    vocab.check_model(model.config.vocab_size, model.config.modalities)
    grammar = SpanGrammar(vocab, model.config.vocab_size, span_lengths(tokenizer), max_span)
    state = grammar.start(prompt.tolist())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        ids = prompt.to(device)
        out = model(ids[None], vocab.modality_of(ids)[None], return_cache=True)
        cache, logits = out.cache, out.logits[0, -1]
        new: List[int] = []
        while len(new) < max_new_tokens and not state.done:
            allowed = grammar.allowed(state).to(device)
            token = sample(logits.float().masked_fill(~allowed, float("-inf")), temperature, top_k, generator)
            new.append(token)
            state = grammar.advance(state, token)
            if not state.done and len(new) < max_new_tokens:
                step_ids = torch.tensor([token], device=device)
                logits = model.step(step_ids, vocab.modality_of(step_ids), cache)[0]
    finally:
        model.train(was_training)
    return torch.cat([prompt, torch.tensor(new, dtype=prompt.dtype)])


# ---------------------------------------------------------------- prompts and outputs
def split_spans(ids: Sequence[int], vocab: Vocabulary) -> List[Span]:
    """The complete spans of a document's ids (<bos>/<eos> skipped, an unterminated last span dropped)."""
    modality_of = vocab.modality_of(torch.tensor(list(ids), dtype=torch.long)).tolist()
    spans: List[Span] = []
    i = 0
    while i < len(ids):
        m = vocab.modalities[modality_of[i]]
        if ids[i] in (vocab.bos, vocab.eos):
            i += 1
        elif m.name == TEXT:
            j = i
            while j < len(ids) and modality_of[j] == modality_of[i] and ids[j] not in (vocab.bos, vocab.eos):
                j += 1
            spans.append(Span(TEXT, i, j))
            i = j
        else:
            j = i + 1
            while j < len(ids) and ids[j] != m.end:
                j += 1
            if j == len(ids):
                break
            spans.append(Span(m.name, i + 1, j))
            i = j + 1
    return spans


def parse_prompt(parts: Sequence[str], tokenizer: MultimodalTokenizer, then: Optional[str] = None) -> torch.Tensor:
    """Prompt ids `[T]` from spans written "text:<words>", "image:<file.png>", "speech:<file.wav>";
    `then` opens a span of that modality at the end (the model continues inside it)."""
    vocab = tokenizer.vocab
    pieces = [torch.tensor([vocab.bos])]
    for part in parts:
        modality, sep, value = part.partition(":")
        if not sep or modality not in tokenizer.tokenizers:
            raise ValueError(f"momoe: a prompt span is '<modality>:<value>' with a modality of {list(vocab.names)}, "
                             f"got {part!r}")
        pieces.append(tokenizer.encode_span(modality, load_payload(modality, value, tokenizer)))
    if then is not None and then != TEXT:
        pieces.append(torch.tensor([vocab.modality(then).begin]))
    return torch.cat(pieces)


def load_payload(modality: str, value: str, tokenizer: MultimodalTokenizer):
    """The payload of a prompt span: the text itself, a PNG image (scaled down to the tokenizer's size by
    averaging when it is an integer multiple of it) or a WAV file at the tokenizer's sample rate."""
    if modality == TEXT:
        return value
    if not os.path.isfile(value):
        raise ValueError(f"momoe: the {modality} file {value!r} does not exist")
    tok = tokenizer.tokenizer(modality)
    if modality == "image":
        image = read_png(value)
        (h, w), (H, W) = tok.image_size, image.shape
        if H % h or W % w:
            raise ValueError(f"momoe: {value} is {H}x{W} pixels; images here are {h}x{w} (or a multiple of it)")
        return image.reshape(h, H // h, w, W // w).mean((1, 3))
    waveform, rate = read_wav(value)
    if rate != tok.sample_rate:
        raise ValueError(f"momoe: {value} is sampled at {rate} Hz; the speech tokenizer needs {tok.sample_rate} Hz")
    return waveform


def save_continuation(ids: torch.Tensor, prompt_length: int, tokenizer: MultimodalTokenizer, out_dir: str,
                      prefix: str = "generated") -> Tuple[str, List[str]]:
    """Decode a document; write each generated image span as PNG and speech span as WAV under out_dir.
    Returns a transcript (text spans inline, files named in brackets, generated part after '>>> ')
    and the written files."""
    os.makedirs(out_dir, exist_ok=True)
    vocab = tokenizer.vocab
    parts, files = [], []
    marked = False
    for index, span in enumerate(split_spans(ids.tolist(), vocab)):
        generated = span.stop > prompt_length
        if generated and not marked:
            parts.append(">>> ")
            marked = True
        codes = vocab.to_local(span.modality, ids[span.start:span.stop])
        payload = tokenizer.tokenizer(span.modality).decode(codes)
        if span.modality == TEXT:  # sampled bytes may be control characters: keep the terminal sane
            parts.append("".join(c if c.isprintable() or c == "\n" else "\ufffd" for c in payload))
            continue
        if not generated:
            parts.append(f"[{span.modality}]")
            continue
        path = os.path.join(out_dir, f"{prefix}-{index}-{span.modality}.{'png' if span.modality == 'image' else 'wav'}")
        if span.modality == "image":
            write_png(path, payload, scale=IMAGE_SCALE)
        else:
            write_wav(path, payload, tokenizer.tokenizer(span.modality).sample_rate)
        files.append(path)
        parts.append(f"[{span.modality}: {path}]")
    transcript = "".join(parts)
    with open(os.path.join(out_dir, f"{prefix}.txt"), "w") as f:
        f.write(transcript + "\n")
    return transcript, files
