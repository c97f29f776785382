"""Generation conformance of a model, in the place of transformers' `GenerationTesterMixin` (which its sdist lacks).

Mixed into the common-test classes of `test_transformers_common.py` (that file's `MoTModelTester` provides the
model and inputs). Every decoding mode must give the same sequences with and without the KV cache, a generation
continued from a returned cache or from `inputs_embeds` must equal one whole generation, left padding must not
change what a prompt generates, and a static cache must agree with the dynamic one.

MoT and Expert Choice are batch-dependent by design: a sequence's output depends on the sequences of its group.
Every comparison here therefore keeps the batch and its columns as they are (same rows, same positions), which is
also what the method promises (docs/design.md, "Batch dependence"): with a KV cache each decoding step groups the batch's tokens of that
step exactly as a full forward groups the same columns. Where a test pads, it pads every row alike unless the
class says `batch_independent = True`.
"""

from __future__ import annotations

import copy

import torch

from mixture_of_tokens.modeling.modeling_mot import CACHE_NAME

MAX_NEW_TOKENS = 4


class GenerationTesterMixin:
    batch_independent = False  # True: rows may be padded differently (the model never mixes sequences)

    # ------------------------------------------------------------------ helpers

    @property
    def all_generative_model_classes(self):
        return tuple(cls for cls in self.all_model_classes if hasattr(cls, "generate") and cls.can_generate())

    def _generative_model_and_inputs(self, model_class):
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        torch.manual_seed(0)
        model = model_class(config).eval()
        inputs = {key: inputs[key] for key in ("input_ids", "attention_mask") if key in inputs}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        # The random prompts must not end in the end-of-sequence token: such a prompt is a finished sequence, which
        # releases treat differently (5.9's prompt-lookup decoding generates nothing for it, greedy goes on).
        last = inputs["input_ids"][:, -1]
        eos = config.eos_token_id
        inputs["input_ids"][:, -1] = torch.where(last == eos, (eos + 1) % config.vocab_size, last)
        return model, inputs

    def _generate(self, model, inputs, **kwargs):
        # min_new_tokens: no sequence stops early at the end-of-sequence token, so every run has the same length.
        settings = dict(max_new_tokens=MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                        output_scores=True, return_dict_in_generate=True,
                        pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
        settings.update(kwargs)
        with torch.no_grad():
            return model.generate(**inputs, **settings)

    def _assert_same_generation(self, first, second, atol=1e-5):
        self.assertTrue(torch.equal(first.sequences, second.sequences),
                        f"{first.sequences.tolist()} != {second.sequences.tolist()}")
        if first.scores is not None and second.scores is not None:
            for step, (one, two) in enumerate(zip(first.scores, second.scores, strict=True)):
                torch.testing.assert_close(one, two, atol=atol, rtol=1e-4, msg=lambda m, s=step: f"step {s}: {m}")

    def _cache_and_no_cache(self, **kwargs):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            torch.manual_seed(42)
            cached = self._generate(model, inputs, use_cache=True, **kwargs)
            torch.manual_seed(42)
            uncached = self._generate(model, inputs, use_cache=False, **kwargs)
            self._assert_same_generation(cached, uncached)
            self.assertEqual(cached.sequences.shape[1], inputs["input_ids"].shape[1] + MAX_NEW_TOKENS)

    # ------------------------------------------------------------------ decoding modes, cache vs no cache

    def test_greedy_generate_cache_matches_no_cache(self):
        self._cache_and_no_cache()

    def test_greedy_generate_matches_one_uncached_forward(self):
        """The scores that chose each token equal the logits of one uncached forward over the final sequences."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            generated = self._generate(model, inputs, output_logits=True)  # raw logits, before min_new_tokens
            prompt_length = inputs["input_ids"].shape[1]
            with torch.no_grad():
                logits = model(input_ids=generated.sequences, use_cache=False).logits[:, prompt_length - 1 : -1]
            torch.testing.assert_close(torch.stack(generated.logits, 1), logits, atol=1e-5, rtol=1e-4)
            # The chosen tokens: the argmax of the scores (the logits with the end-of-sequence token suppressed).
            chosen = torch.stack(generated.scores, 1).argmax(-1)
            self.assertTrue(torch.equal(chosen, generated.sequences[:, prompt_length:]))

    def test_sample_generate_cache_matches_no_cache(self):
        self._cache_and_no_cache(do_sample=True, top_k=0, temperature=1.0)

    def test_beam_search_generate_cache_matches_no_cache(self):
        self._cache_and_no_cache(num_beams=2, output_scores=False)

    def test_assisted_decoding_matches_greedy(self):
        """Assisted decoding (one sequence, as transformers allows) verifies several candidate tokens per forward:
        with itself as the assistant, and with the prompt-lookup candidates, it must produce greedy's tokens."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            single = {key: value[:1] for key, value in inputs.items()}
            # Without min_new_tokens (which some releases apply unevenly to the verified candidates): a run may stop
            # at the end-of-sequence token, and then all three stop there.
            plain = dict(output_scores=False, min_new_tokens=None)
            greedy = self._generate(model, single, **plain)
            assisted = self._generate(model, single, assistant_model=model, **plain)
            lookup = self._generate(model, single, prompt_lookup_num_tokens=2, **plain)
            for name, other in (("assisted", assisted), ("prompt lookup", lookup)):
                self.assertTrue(torch.equal(greedy.sequences, other.sequences),
                                f"{name}: {other.sequences.tolist()} != greedy {greedy.sequences.tolist()}")

    # ------------------------------------------------------------------ continuing a generation

    def test_generate_continue_from_returned_cache(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            whole = self._generate(model, inputs, max_new_tokens=2 * MAX_NEW_TOKENS,
                                   min_new_tokens=2 * MAX_NEW_TOKENS)
            first = self._generate(model, inputs)
            continued_inputs = {
                "input_ids": first.sequences,
                "attention_mask": torch.ones_like(first.sequences),
                CACHE_NAME: copy.deepcopy(first.get(CACHE_NAME)),
            }
            second = self._generate(model, continued_inputs)
            self.assertTrue(torch.equal(whole.sequences, second.sequences))
            for one, two in zip(whole.scores[MAX_NEW_TOKENS:], second.scores, strict=True):
                torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-4)

    def test_generate_from_inputs_embeds_and_continue(self):
        """From `inputs_embeds`: the same tokens as from `input_ids`, and continuing with the returned cache (the
        embeddings of the whole sequence so far) equals one whole generation."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            embed = model.get_input_embeddings()
            with torch.no_grad():
                embeds = embed(inputs["input_ids"])
            from_ids = self._generate(model, inputs)
            from_embeds = self._generate(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]})
            prompt_length = inputs["input_ids"].shape[1]
            # From embeddings, generate() returns only the new tokens.
            self.assertTrue(torch.equal(from_ids.sequences[:, prompt_length:], from_embeds.sequences))

            whole = self._generate(model, {"inputs_embeds": embeds, "attention_mask": inputs["attention_mask"]},
                                   max_new_tokens=2 * MAX_NEW_TOKENS, min_new_tokens=2 * MAX_NEW_TOKENS)
            with torch.no_grad():
                so_far = torch.cat([embeds, embed(from_embeds.sequences)], dim=1)
            continued = self._generate(model, {
                "inputs_embeds": so_far,
                "attention_mask": torch.ones(so_far.shape[:2], dtype=torch.long),
                CACHE_NAME: copy.deepcopy(from_embeds.get(CACHE_NAME)),
            })
            self.assertTrue(torch.equal(whole.sequences[:, MAX_NEW_TOKENS:], continued.sequences))

    # ------------------------------------------------------------------ padding and static cache

    def test_left_padding_does_not_change_generation(self):
        """Every row left-padded by the same amount generates what it generates unpadded (for every model: the
        groups keep their columns), and, for a batch-independent model, prompts of different lengths left-padded
        in one batch generate what each generates alone."""
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            input_ids = inputs["input_ids"]
            batch_size, pad_id = input_ids.shape[0], model.config.pad_token_id or 0
            padding = torch.full((batch_size, 3), pad_id)
            padded = self._generate(model, {"input_ids": torch.cat([padding, input_ids], 1),
                                            "attention_mask": torch.cat([torch.zeros_like(padding),
                                                                         torch.ones_like(input_ids)], 1)})
            plain = self._generate(model, inputs)
            self.assertTrue(torch.equal(plain.sequences[:, -MAX_NEW_TOKENS:], padded.sequences[:, -MAX_NEW_TOKENS:]))
            for one, two in zip(plain.scores, padded.scores, strict=True):
                torch.testing.assert_close(one, two, atol=1e-4, rtol=1e-4)
            if not self.batch_independent:
                continue
            # Row i drops its first i % 3 tokens and is left-padded back to the batch's width.
            pads = torch.arange(batch_size) % 3
            ragged_mask = (torch.arange(input_ids.shape[1]) >= pads[:, None]).long()
            ragged_ids = input_ids.masked_fill(ragged_mask == 0, pad_id)
            together = self._generate(model, {"input_ids": ragged_ids, "attention_mask": ragged_mask})
            for row in range(batch_size):
                prompt = input_ids[row : row + 1, int(pads[row]) :]
                alone = self._generate(model, {"input_ids": prompt, "attention_mask": torch.ones_like(prompt)})
                self.assertTrue(torch.equal(alone.sequences[0, -MAX_NEW_TOKENS:],
                                            together.sequences[row, -MAX_NEW_TOKENS:]), f"row {row}")
                for one, two in zip(alone.scores, together.scores, strict=True):
                    torch.testing.assert_close(one[0], two[row], atol=1e-4, rtol=1e-4)

    def test_static_cache_matches_dynamic_cache(self):
        for model_class in self.all_generative_model_classes:
            model, inputs = self._generative_model_and_inputs(model_class)
            dynamic = self._generate(model, inputs)
            static = self._generate(model, inputs, cache_implementation="static")
            self._assert_same_generation(dynamic, static)
