"""The teacher's tokenizer must give the student data's ids: vocabulary size, then sample encodings."""

import pytest

from megatron_cocomix.concepts import check_teacher_tokenizer
from tests.helpers.concept_files import save_tiny_gpt2

WORDS = ["<unk>", "</s>", "the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "."]


def save_word_tokenizer(path, words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>").save_pretrained(path)
    return path


def student(path):
    from megatron_cocomix.data.tokenizer import build_tokenizer_from_flags

    return build_tokenizer_from_flags("HuggingFaceTokenizer", tokenizer_model=str(path))


TEXTS = ["the quick brown fox", "jumps over the lazy dog ."]


def test_same_tokenizer_passes_and_mismatch_is_refused(tmp_path):
    teacher = save_tiny_gpt2(str(tmp_path / "teacher"), vocab_size=len(WORDS))
    save_word_tokenizer(teacher, WORDS)
    check_teacher_tokenizer(teacher, student(save_word_tokenizer(str(tmp_path / "same"), WORDS)), TEXTS)

    swapped = WORDS[:2] + ["quick", "the"] + WORDS[4:]
    with pytest.raises(ValueError, match=r"tokenises 'the quick brown fox' as \[2, 3, 4, 5\] but the student "
                                         r"tokenizer gives \[3, 2, 4, 5\]"):
        check_teacher_tokenizer(teacher, student(save_word_tokenizer(str(tmp_path / "swapped"), swapped)), TEXTS)

    with pytest.raises(ValueError, match=f"vocabulary of {len(WORDS)} tokens but the student tokenizer has "
                                         f"{len(WORDS) + 1}"):
        check_teacher_tokenizer(teacher, student(save_word_tokenizer(str(tmp_path / "more"), WORDS + ["cat"])), TEXTS)


def test_missing_teacher_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        check_teacher_tokenizer(str(tmp_path / "none"), None)
