"""Adapter for BLIP-2 (``Blip2ForConditionalGeneration`` with a decoder-only language model, e.g. OPT),
and the machinery it shares with LLaVA (:class:`ImageToTextAdapter`).

Towers: ``vision`` = the ViT encoder layers (``vision_model.encoder.layers``), ``language`` = the
decoder layers of ``language_model``. The Q-Former, the query tokens and the language projection
are not pruned; the ``blip2_qformer`` family (set ``model.family: blip2_qformer``) adds a ``qformer``
tower of the Q-Former layers between the two.

Prompts follow the BLIP-2 processor: ``num_query_tokens`` image tokens, then BOS and the text.
Calibration (captioning, the BLIP-2 pre-training task): training-split images with a caption from
the training templates; loss = next-token cross-entropy on the caption tokens only.
Evaluation on held-out images (:meth:`ImageToTextAdapter.evaluate`), visual question answering:
``vqa_accuracy`` = normalised exact match of the greedy answer to "Question: What number is in the
image? Answer:" (digits; "What is in the image?" for other sets) with the class name (for digits
also the numeral); ``answer_loss`` = mean token cross-entropy of the reference answer after the
question; outputs: the next-token log-probabilities at the answer positions (KL fidelity).

VQA-style sets (per-example ``questions`` and ``answers``, :class:`vlmprune.data.images.ImageDataset`):
calibration uses each image's own question as the prompt and its answer as the target (prompts of
different lengths: right-padded, labels on the answer tokens only, attention mask 0 on padding);
evaluation groups the held-out images by question, so each ``generate`` call still sees one prompt
(no padding), and ``vqa_accuracy`` = mean over images of [normalize(greedy answer) ==
normalize(the image's answer)] (exact match after the normalisation of :func:`normalize_answer`,
with one reference answer per image rather than the ten-annotator VQA score of Antol et al. 2015).
"""

from __future__ import annotations

import re
import string

import numpy as np
import torch
import torch.nn as nn

from vlmprune.adapters.base import ADAPTERS, LoadedModel, ModelAdapter, Tower
from vlmprune.adapters.causal_lm import architectures, find_layer_list, lm_loss, pad_token_id, read_config
from vlmprune.adapters.clip import image_stats, load_processor, model_dtype, pixel_values, require_images, tokenizer_of
from vlmprune.data.images import draw_calibration_images, image_split
from vlmprune.data.spec import DataSpec
from vlmprune.evaluators.perplexity import KEPT_BUDGET, kept_positions

QUESTIONS = {"digits": "What number is in the image?"}
DEFAULT_QUESTION = "What is in the image?"
NUMERALS = {"digits": [str(i) for i in range(10)]}


def normalize_answer(text: str) -> str:
    """VQA-style normalisation: lower case, first line, no punctuation, no articles, single spaces."""
    text = text.strip().split("\n")[0].lower()
    text = text.translate(str.maketrans("", "", string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def accepted_answers(dataset: str, class_names: list[str]) -> list[set[str]]:
    """The normalised answers accepted for each class."""
    numerals = NUMERALS.get(dataset)
    return [{normalize_answer(name)} | ({numerals[i]} if numerals else set()) for i, name in enumerate(class_names)]


class ImageToTextAdapter(ModelAdapter):
    """An image encoder feeding a decoder-only language model through image tokens in ``input_ids``."""

    family = ""
    model_class = ""
    caption_prompt = ""  # text before the caption in calibration sequences

    # --- family specifics ------------------------------------------------------------------
    def for_inference(self, model: nn.Module) -> nn.Module:
        """``model`` rewritten in place into a faster form of the same function (up to float rounding),
        for inference only; here unchanged (a family with such a rewrite overrides this)."""
        return model

    def vision_tower(self, model: nn.Module) -> Tower:
        raise NotImplementedError

    def language_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        raise NotImplementedError

    def image_size(self, model: nn.Module) -> int:
        return model.config.vision_config.image_size

    def n_image_tokens(self, model: nn.Module) -> int:
        raise NotImplementedError

    def prompt_ids(self, loaded: LoadedModel, text: str) -> list[int]:
        """Token ids of a prompt with the image tokens in place."""
        raise NotImplementedError

    def question_prompt(self, question: str) -> str:
        raise NotImplementedError

    # --- shared ------------------------------------------------------------------------------
    def image_token_id(self, model: nn.Module) -> int:
        config = model.config
        value = getattr(config, "image_token_id", None)
        value = getattr(config, "image_token_index", None) if value is None else value
        if value is None:
            raise ValueError(f"{type(model).__name__} config has no image_token_id (image_token_index); this "
                             "transformers version needs image tokens in input_ids: use a checkpoint whose "
                             "config sets it")
        return int(value)

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        import transformers

        model = getattr(transformers, self.model_class).from_pretrained(model_id, dtype=dtype).to(device).eval()
        return LoadedModel(model, load_processor(model_id))

    def towers(self, model: nn.Module) -> list[Tower]:
        path, layers = self.language_layers(model)
        language = [(f"{path}.{i}", layer) for i, layer in enumerate(layers)]
        return [self.vision_tower(model), Tower("language", language, self.run_full)]

    @staticmethod
    def run_full(model: nn.Module, batch: dict):
        """The whole model on a batch (pixels, prompt and answer tokens): its output, with ``.logits``."""
        return model(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"],
                     attention_mask=batch["attention_mask"], use_cache=False)

    def loss(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(self.run_full(model, batch).logits, batch["labels"])

    def sample_losses(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return lm_loss(self.run_full(model, batch).logits, batch["labels"], reduction="sample")

    def loss_head(self, model: nn.Module) -> nn.Module | None:
        """The language model's output head (``VisionLM`` is a plain module: its ``language_model``'s)."""
        if hasattr(model, "get_output_embeddings"):
            return model.get_output_embeddings()
        return model.language_model.get_output_embeddings()

    def _text_ids(self, loaded: LoadedModel, text: str) -> list[int]:
        return tokenizer_of(loaded.processor)(text, add_special_tokens=False)["input_ids"] if text else []

    def _bos(self, loaded: LoadedModel) -> list[int]:
        bos = tokenizer_of(loaded.processor).bos_token_id
        return [int(bos)] if bos is not None else []

    def _answer_ids(self, loaded: LoadedModel, prompt: str, answer: str) -> list[int]:
        """Tokens of `` answer`` as they follow ``prompt`` (tokenized together when that splits cleanly)."""
        tokenizer = tokenizer_of(loaded.processor)
        head = self._text_ids(loaded, prompt)
        full = self._text_ids(loaded, f"{prompt} {answer}")
        ids = full[len(head):] if full[:len(head)] == head and len(full) > len(head) else self._text_ids(loaded, f" {answer}")
        return ids + ([int(tokenizer.eos_token_id)] if tokenizer.eos_token_id is not None else [])

    def _sequences(self, loaded: LoadedModel, prompt: str, answers: list[str]) -> dict[str, torch.Tensor]:
        """prompt + answer per example, right-padded; labels are the answer tokens only."""
        return self._pair_sequences(loaded, [prompt] * len(answers), answers)

    def _pair_sequences(self, loaded: LoadedModel, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        """Each example's own prompt + answer, right-padded to the longest; labels are the answer tokens
        only (-100 on the prompt and the padding), attention mask 1 on prompt and answer, 0 on padding."""
        heads = {p: self.prompt_ids(loaded, p) for p in dict.fromkeys(prompts)}
        rows = [(heads[p], self._answer_ids(loaded, p, a)) for p, a in zip(prompts, answers)]
        length = max(len(head) + len(body) for head, body in rows)
        pad = pad_token_id(tokenizer_of(loaded.processor))
        ids = torch.full((len(answers), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        labels = torch.full_like(ids, -100)
        for i, (head, body) in enumerate(rows):
            n = len(head) + len(body)
            ids[i, :n] = torch.tensor(head + body)
            mask[i, :n] = 1
            labels[i, len(head):n] = torch.tensor(body)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    def _question_sequences(self, loaded: LoadedModel, data, index: np.ndarray) -> dict[str, torch.Tensor]:
        """The images ``index`` of a VQA-style set: each one's question prompt + its answer."""
        rows = np.asarray(index).tolist()
        return self._pair_sequences(loaded, [self.question_prompt(data.questions[i]) for i in rows],
                                    [data.answers[i] for i in rows])

    def _pixels(self, loaded: LoadedModel, images: np.ndarray) -> torch.Tensor:
        mean, std = image_stats(loaded.processor)
        return pixel_values(images, self.image_size(loaded.model), mean, std).to(model_dtype(loaded.model))

    def make_calibration(self, loaded: LoadedModel, spec: DataSpec, n_samples: int, seed: int) -> dict[str, torch.Tensor]:
        """``n_samples`` training-split images, each with a training-template caption as the target (a
        VQA-style set: each with its own question as the prompt and its answer as the target)."""
        require_images(spec, self.family)
        data, index, _, captions, _ = draw_calibration_images(spec, n_samples, seed)
        sequences = (self._question_sequences(loaded, data, index) if data.has_questions
                     else self._sequences(loaded, self.caption_prompt, captions))
        return {"index": torch.from_numpy(index), "pixel_values": self._pixels(loaded, data.images[index]),
                **sequences}

    def _eval_batches(self, loaded: LoadedModel, spec: DataSpec, data, test: np.ndarray, batch_size: int):
        """The held-out images as (prompt, indices) batches with one prompt each, the reference answer and
        the accepted normalised answers of each image, and the generation budget in tokens."""
        if data.has_questions:
            groups = {}
            for i in test.tolist():
                groups.setdefault(data.questions[i], []).append(i)
            batches = [(self.question_prompt(q), np.asarray(rows[s:s + batch_size]))
                       for q, rows in groups.items() for s in range(0, len(rows), batch_size)]
            references = {i: data.answers[i] for i in test.tolist()}
            accepted = {i: {normalize_answer(a)} for i, a in references.items()}
            max_new = max(len(self._answer_ids(loaded, "", a)) for a in set(references.values())) + 1
            return batches, references, accepted, max_new
        prompt = self.question_prompt(QUESTIONS.get(spec.name, DEFAULT_QUESTION))
        batches = [(prompt, test[s:s + batch_size]) for s in range(0, len(test), batch_size)]
        by_class = accepted_answers(spec.name, data.class_names)
        references = {i: data.class_names[data.labels[i]] for i in test.tolist()}
        accepted = {i: by_class[data.labels[i]] for i in test.tolist()}
        max_new = max(len(self._answer_ids(loaded, prompt, a)) for a in data.class_names) + 1
        return batches, references, accepted, max_new

    @torch.no_grad()
    def evaluate(self, loaded: LoadedModel, spec: DataSpec, batch_size: int, max_samples: int | None,
                 device: str, progress: bool = False) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
        """VQA exact-match accuracy and answer loss on the held-out images (see the module docstring)."""
        require_images(spec, self.family)
        data, _, test = image_split(spec)
        test = test[:max_samples] if max_samples else test
        model, tokenizer = loaded.model, tokenizer_of(loaded.processor)
        batches, references, accepted, max_new = self._eval_batches(loaded, spec, data, test, batch_size)
        pad = pad_token_id(tokenizer)
        heads = {}
        correct, nll, n_tokens, answer_logprobs = 0, 0.0, 0, []
        for prompt, index in batches:
            if prompt not in heads:
                heads[prompt] = torch.tensor(self.prompt_ids(loaded, prompt))
            pixels = self._pixels(loaded, data.images[index]).to(device)
            # greedy answer to the question (the prompt is the same for every image of a batch: no padding)
            ids = heads[prompt].unsqueeze(0).expand(len(index), -1).to(device)
            generated = model.generate(input_ids=ids, pixel_values=pixels, attention_mask=torch.ones_like(ids),
                                       max_new_tokens=max_new, do_sample=False, pad_token_id=pad)
            if generated.shape[1] >= ids.shape[1] and torch.equal(generated[:, :ids.shape[1]], ids):
                generated = generated[:, ids.shape[1]:]
            for text, i in zip(tokenizer.batch_decode(generated, skip_special_tokens=True), index.tolist()):
                correct += normalize_answer(text) in accepted[i]
            # teacher-forced reference answers
            answers = [references[i] for i in index.tolist()]
            batch = {k: v.to(device) for k, v in self._sequences(loaded, prompt, answers).items()}
            logits = self.run_full(model, {**batch, "pixel_values": pixels}).logits
            token_nll = lm_loss(logits, batch["labels"], reduction="none")
            scored = batch["labels"][:, 1:] != -100
            nll += float(token_nll[scored].double().sum())
            n_tokens += int(scored.sum())
            answer_logprobs.append(torch.log_softmax(logits[:, :-1][scored].float(), dim=-1).cpu())
        answer_logprobs = torch.cat(answer_logprobs)
        keep = kept_positions(len(answer_logprobs), max(1, KEPT_BUDGET // answer_logprobs.shape[-1]))
        metrics = {"vqa_accuracy": correct / len(test), "answer_loss": nll / max(n_tokens, 1)}
        return metrics, {"answer_logits": answer_logprobs[torch.from_numpy(keep)]}


@ADAPTERS.register("blip2")
class Blip2Adapter(ImageToTextAdapter):
    family = "blip2"
    model_class = "Blip2ForConditionalGeneration"
    caption_prompt = ""

    def load(self, model_id: str, dtype: torch.dtype, device: str) -> LoadedModel:
        loaded = super().load(model_id, dtype, device)
        if not loaded.model.config.use_decoder_only_language_model:
            raise ValueError(f"{model_id}: BLIP-2 with an encoder-decoder language model (Flan-T5) is not supported; "
                             "use a decoder-only one (OPT)")
        return loaded

    def vision_tower(self, model: nn.Module) -> Tower:
        layers = [(f"vision_model.encoder.layers.{i}", l) for i, l in enumerate(model.vision_model.encoder.layers)]
        return Tower("vision", layers, lambda m, b: m.vision_model(pixel_values=b["pixel_values"]))

    def language_layers(self, model: nn.Module) -> tuple[str, nn.ModuleList]:
        path, layers = find_layer_list(model.language_model, model.config.text_config.num_hidden_layers)
        return f"language_model.{path}", layers

    def n_image_tokens(self, model: nn.Module) -> int:
        return model.config.num_query_tokens

    def prompt_ids(self, loaded: LoadedModel, text: str) -> list[int]:
        image = [self.image_token_id(loaded.model)] * self.n_image_tokens(loaded.model)
        return image + self._bos(loaded) + self._text_ids(loaded, text)

    def question_prompt(self, question: str) -> str:
        return f"Question: {question} Answer:"

    @classmethod
    def matches(cls, model_id: str) -> bool:
        config = read_config(model_id)
        if config is None:
            return False
        return config.model_type == "blip-2" or "Blip2ForConditionalGeneration" in architectures(config)


@ADAPTERS.register("blip2_qformer")
class Blip2QFormerAdapter(Blip2Adapter):
    """BLIP-2 with the Q-Former layers pruned too (tower ``qformer``); never auto-detected."""

    family = "blip2_qformer"

    def towers(self, model: nn.Module) -> list[Tower]:
        vision, language = super().towers(model)
        layers = [(f"qformer.encoder.layer.{i}", l) for i, l in enumerate(model.qformer.encoder.layer)]
        qformer = Tower("qformer", layers, lambda m, b: m.get_image_features(pixel_values=b["pixel_values"]))
        return [vision, qformer, language]

    @classmethod
    def matches(cls, model_id: str) -> bool:
        return False
