"""Training-side concept labelling: a teacher that cannot read the student's token ids is refused."""

import argparse
import os
import shutil

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tests.helpers.cocomix_assets import TEACHER_LAYER, tiny_sae, tiny_teacher


def _args(teacher, tokenizer_type):
    return argparse.Namespace(teacher_model=teacher, teacher_layer=TEACHER_LAYER, sae=tiny_sae(),
                              tokenizer_type=tokenizer_type, concept_num_labels=4, concept_attribution="act")


def test_online_teacher_refuses_a_larger_student_vocabulary():
    from megatron_cocomix.concepts.labeling import check_teacher_reads_student_ids

    student = argparse.Namespace(vocab_size=1000)
    with pytest.raises(ValueError, match=r"the data tokenizer has 1000 ids but teacher .* only 256"):
        check_teacher_reads_student_ids(_args(tiny_teacher(), "NullTokenizer"), student, 256)
    check_teacher_reads_student_ids(_args(tiny_teacher(), "NullTokenizer"), argparse.Namespace(vocab_size=256), 256)


def test_online_teacher_refuses_other_encodings(tmp_path):
    from megatron_cocomix.concepts.labeling import check_teacher_reads_student_ids
    from megatron_cocomix.data.tokenizer import build_tokenizer

    gpt2 = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                        "examples", "data", "gpt2")
    # The GPT-2 student against a copy of a GPT-2-vocabulary teacher whose own tokenizer is another one (a small
    # byte-level BPE trained on other text).
    teacher_dir = tiny_teacher(vocab_size=50257, width=32, layers=2)
    other = str(tmp_path / "teacher")
    shutil.copytree(teacher_dir, other)
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel()
    raw.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10,
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for name in ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if os.path.exists(os.path.join(other, name)):
            os.remove(os.path.join(other, name))
    PreTrainedTokenizerFast(tokenizer_object=raw).save_pretrained(other)
    student = build_tokenizer(argparse.Namespace(
        tokenizer_type="GPT2BPETokenizer", vocab_file=os.path.join(gpt2, "encoder.json"),
        merge_file=os.path.join(gpt2, "vocab.bpe"), tokenizer_model=None, vocab_size=None,
        make_vocab_size_divisible_by=128, tensor_model_parallel_size=1))
    with pytest.raises(ValueError, match="the teacher must share the student's tokenizer"):
        check_teacher_reads_student_ids(_args(other, "GPT2BPETokenizer"), student, 50257)
    # The same teacher with the GPT-2 tokenizer is accepted.
    check_teacher_reads_student_ids(_args(teacher_dir, "GPT2BPETokenizer"), student, 50257)
