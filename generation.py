"""Greedy generation as the official SemEval-2025 Task 4 scorer did it (its strings), continuously batched: rows
leave the batch at their stop token and waiting prompts join it."""

import sys

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

import records
from batches import length_batches, pad_batch, progress
from cli import InputError

# generation_config fields that would change which token greedy decoding picks, with their neutral values.
GREEDY_NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "min_new_tokens": 0,
                  "bad_words_ids": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                  "forced_bos_token_id": None, "forced_eos_token_id": None, "sequence_bias": None,
                  "exponential_decay_length_penalty": None, "stop_strings": None}


def ignored_generation_settings(model):
    """generation_config settings that ``model.generate`` would apply and plain greedy decoding ignores."""
    config = getattr(model, "generation_config", None)
    return {name: getattr(config, name) for name, neutral in GREEDY_NEUTRAL.items()
            if getattr(config, name, neutral) not in (neutral, None)}


def stop_token_ids(model, tokenizer):
    """The ids greedy generation stops at: the model's generation config eos, else the tokenizer's."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def clean_up_tokenization(text):
    """transformers 4.x's ``clean_up_tokenization_spaces=True`` step, which the official scorer (Jan 2025) applied
    to every decode. transformers 5 silently skips it for BPE tokenizers (OLMo's included), so it is applied here
    explicitly to reproduce the official strings (e.g. 'Paris .' -> 'Paris.', which changes an exact match)."""
    return (text.replace(" .", ".").replace(" ?", "?").replace(" !", "!").replace(" ,", ",").replace(" ' ", "'")
            .replace(" n't", "n't").replace(" 'm", "'m").replace(" 's", "'s").replace(" 've", "'ve")
            .replace(" 're", "'re"))


def decode_generation(tokenizer, new_ids):
    """New tokens -> text as the official scorer decoded them: special tokens skipped, 4.x clean-up applied."""
    text = tokenizer.decode(new_ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    return clean_up_tokenization(text)


def generate_outputs(model, tokenizer, prompts, max_new_tokens=256, batch_size=16, show_progress=False):
    """Greedy continuations of raw prompts, decoded without special tokens, in input order.

    Prompts are tokenised as the official scorer does (records.encode_prompt). Up to ``batch_size`` rows decode
    together (continuous batching): a row leaves the batch at its first stop token, and when half the batch has
    left, waiting prompts join it, prefilled in groups of similar length. So neither prompt padding nor finished rows
    cost decoding steps, which is where ``model.generate`` on fixed batches spends its time (a batch pads to its
    longest prompt and decodes until its longest answer ends). Rows are left-padded and masked, with positions
    counted from their first real token: in float32 the strings equal batch-size-1 generation.
    """
    encoded = [records.encode_prompt(tokenizer, prompt) for prompt in prompts]
    for i, ids in enumerate(encoded):
        if not ids:
            raise InputError(f"prompt {i} ({prompts[i][:40]!r}) tokenises to nothing; cannot generate from it")
    ignored = ignored_generation_settings(model)
    if ignored:
        print(f"[WARNING] the model's generation_config sets {ignored}; evaluate.py decodes plain greedy, as the "
              f"official scorer did for the challenge's OLMo models, and ignores them", file=sys.stderr)
    stop_ids = set(stop_token_ids(model, tokenizer))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    device = next(model.parameters()).device
    waiting = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))  # longest first: an OOM shows at once
    new_tokens = [[] for _ in prompts]
    batch = None
    bar = progress(len(prompts), "generate", show_progress)
    with torch.no_grad():
        while waiting or batch is not None:
            if waiting and (batch is None or (len(batch.rows) <= batch_size // 2 and batch.can_merge)):
                joining = waiting[:batch_size - (len(batch.rows) if batch else 0)]
                waiting = waiting[len(joining):]
                for group in length_batches([len(encoded[i]) for i in joining], batch_size):
                    rows = [joining[j] for j in group]
                    prefilled = DecodingBatch.prefill(model, rows, [encoded[i] for i in rows], pad_id, device)
                    batch = prefilled if batch is None else batch.merge(prefilled, model.config)
            next_tokens = batch.logits.argmax(dim=-1)
            keep = []
            for position, (row, token) in enumerate(zip(batch.rows, next_tokens.tolist())):
                new_tokens[row].append(token)
                if token in stop_ids or len(new_tokens[row]) == max_new_tokens:
                    bar.update(1)
                else:
                    keep.append(position)
            batch = batch.select(keep)
            if batch is not None:
                batch.step(model, next_tokens[keep])
    bar.close()
    return [decode_generation(tokenizer, ids) for ids in new_tokens]


class DecodingBatch:
    """Rows being decoded together: their KV cache, 2-D attention mask (0 = left padding), the position of each
    row's next token, and the logits predicting it."""

    def __init__(self, rows, cache, attention_mask, next_positions, logits):
        self.rows, self.cache, self.attention_mask = rows, cache, attention_mask
        self.next_positions, self.logits = next_positions, logits
        # Merging rebuilds the cache layer by layer, which is only right for plain (non-sliding) layers; other
        # caches run as fixed batches that still drop finished rows.
        self.can_merge = all(type(layer) is DynamicLayer for layer in cache.layers)

    @classmethod
    def prefill(cls, model, rows, encoded, pad_id, device):
        padded = pad_batch([{"input_ids": ids} for ids in encoded], pad_id, padding_side="left")
        attention_mask = padded["attention_mask"].to(device)
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        cache = DynamicCache(config=model.config)
        logits = model(input_ids=padded["input_ids"].to(device), attention_mask=attention_mask, position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1]
        return cls(rows, cache, attention_mask, positions[:, -1] + 1, logits)

    def step(self, model, tokens):
        """Feed one token per row; the logits for the next one replace the current."""
        self.attention_mask = torch.cat([self.attention_mask, self.attention_mask.new_ones(len(self.rows), 1)], 1)
        self.logits = model(input_ids=tokens[:, None], attention_mask=self.attention_mask,
                            position_ids=self.next_positions[:, None], past_key_values=self.cache,
                            use_cache=True).logits[:, -1]
        self.next_positions = self.next_positions + 1

    def select(self, keep):
        """Keep only the rows at these positions (None when none is left)."""
        if not keep:
            return None
        if len(keep) < len(self.rows):
            index = torch.tensor(keep, device=self.logits.device)
            self.cache.batch_select_indices(index)
            self.rows = [self.rows[i] for i in keep]
            self.attention_mask, self.next_positions = self.attention_mask[index], self.next_positions[index]
            self.logits = self.logits[index]
        return self

    def merge(self, other, config):
        """One batch of both: caches and masks left-padded to a common width, columns that are padding in every
        row dropped."""
        width = max(self.attention_mask.shape[1], other.attention_mask.shape[1])

        def pad_left(tensor, dim):
            missing = width - tensor.shape[dim]
            if not missing:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = missing
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        attention_mask = torch.cat([pad_left(self.attention_mask, 1), pad_left(other.attention_mask, 1)])
        start = int(attention_mask.any(dim=0).int().argmax())  # first column holding a real token of some row
        cache = DynamicCache(config=config)
        for index, (mine, theirs) in enumerate(zip(self.cache.layers, other.cache.layers)):
            keys = torch.cat([pad_left(mine.keys, 2), pad_left(theirs.keys, 2)])[:, :, start:]
            values = torch.cat([pad_left(mine.values, 2), pad_left(theirs.values, 2)])[:, :, start:]
            cache.update(keys, values, index)
        return DecodingBatch(self.rows + other.rows, cache, attention_mask[:, start:],
                              torch.cat([self.next_positions, other.next_positions]),
                              torch.cat([self.logits, other.logits]))
