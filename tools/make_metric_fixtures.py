#!/usr/bin/env python3
"""Writes the reference values the oxtune-eval parity tests compare against.

Run by hand (CI never runs Python; it reads the committed files):

    python3 -m venv ~/.cache/oxtune-metrics
    ~/.cache/oxtune-metrics/bin/pip install -r tools/requirements-metrics.txt
    ~/.cache/oxtune-metrics/bin/python tools/make_metric_fixtures.py

Writes, under tests/fixtures/metrics/:
  pairs.jsonl     the inputs: {"id", "prediction", "references": [...]} one per line
  reference.json  sacrebleu corpus and sentence BLEU (per tokenizer and smoothing),
                  rouge-score ROUGE-1/2/L/Lsum per pair (default tokenizer, with and without
                  the Porter stemmer, and jieba segmentation for Chinese), the NLTK Porter
                  stems of a word list, and jieba's segmentation of every text.

Chinese ROUGE: rouge-score's default tokenizer keeps only [a-z0-9], so Chinese text would
vanish. We segment with jieba (precise mode, HMM on) and keep the lower-cased segments that
hold at least one letter or digit (str.isalnum) -- exactly what oxtune's `jieba` ROUGE
tokenizer does with jieba-rs.
"""

import json
import platform
import sys
from pathlib import Path

import jieba
import nltk
import numpy as np
import rouge_score
import sacrebleu
from nltk.stem import porter
from rouge_score import rouge_scorer

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests" / "fixtures" / "metrics"

# (prediction, [references]); ids are the index.
PAIRS = [
    # English, WMT-like
    ("The cat sat on the mat.", ["The cat is sitting on the mat."]),
    ("There is a cat on the mat.", ["The cat sat on the mat.", "A cat was on the mat."]),
    ("It is a guide to action which ensures that the military always obeys the commands of the party.",
     ["It is a guide to action that ensures that the military will forever heed Party commands.",
      "It is the guiding principle which guarantees the military forces always being under the command of the Party.",
      "It is the practical guide for the army always to heed the directions of the party."]),
    ("he read the book because he was interested in world history",
     ["he was interested in world history because he read the book"]),
    ("The quick brown fox jumps over the lazy dog", ["The quick brown dog jumps on the log."]),
    ("Revenue grew 3.5% to $1,234.56 million in Q3-2024, up from 1,000.", ["Revenue rose 3.5% to $1,234.56 million in Q3-2024."]),
    ("Don't panic -- it's only a test (really).", ["Do not panic - it is only a test, really!"]),
    ("Tom &amp; Jerry said &quot;hi&quot; &lt;loudly&gt;.", ["Tom & Jerry said \"hi\" <loudly>."]),
    ("e-mail me at user@example.com or visit https://example.com/a-b?x=1.", ["Email me at user@example.com, or visit https://example.com/a-b?x=1"]),
    ("The running runners ran quickly; the generalizations were relational.",
     ["A runner runs quick; generalization is relation."]),
    ("Studies of connected connections connecting connectivity.", ["Study the connection of connectivity."]),
    ("The meeting is scheduled for 10:30 a.m. on 2024-05-06.", ["The meeting is at 10:30 am on 2024-05-06."]),
    ("Hello world", ["Hello world"]),
    ("completely unrelated words here", ["nothing in common at all"]),
    ("a", ["a"]),
    ("a b", ["a b c d e f"]),
    ("the the the the the the the", ["The cat is on the mat."]),
    ("Hyphen-ated and multi-word-compounds, e.g. state-of-the-art.", ["State-of-the-art, hyphenated multi-word compounds."]),
    ("First sentence here.\nSecond sentence follows.\nThird one ends.", ["First sentence is here.\nThe second sentence follows.\nAnd a third."]),
    ("Line one\n\nLine two after blank", ["Line one\nLine two"]),
    # Chinese PRD-style
    ("1. 功能概述\n支持用户通过手机号+短信验证码方式登录。\n2. 业务流程\n用户输入手机号，获取验证码后完成登录。",
     ["1. 功能概述\n支持用户使用手机号和短信验证码登录系统。\n2. 业务流程\n用户输入手机号并获取验证码，校验通过后登录成功。"]),
    ("订单列表页支持按时间、状态和金额筛选，并可导出为Excel文件。", ["订单列表支持按下单时间、订单状态筛选，支持导出Excel。"]),
    ("验证码有效期为5分钟，连续失败3次后锁定账号10分钟。", ["验证码5分钟内有效；连续输错3次，账号锁定10分钟。"]),
    ("本需求的目标是提升新用户的注册转化率。", ["该需求旨在提高新用户注册转化率。"]),
    ("非功能需求：接口响应时间P99小于200ms，可用性达到99.9%。", ["非功能性需求：接口P99响应时间低于200毫秒，系统可用性99.9%。"]),
    ("权限说明：仅管理员可以删除项目，普通成员只能查看。", ["权限：管理员可删除项目；普通成员仅可查看。"]),
    ("我们计划在第三季度上线消息推送功能。", ["消息推送功能计划于Q3上线。"]),
    ("用户故事：作为运营人员，我希望批量导入商品，以便节省时间。", ["作为运营，我想要批量导入商品，从而节省录入时间。"]),
    ("验收标准：1）登录成功后跳转首页；2）失败时提示错误原因。", ["验收标准：登录成功跳转到首页，失败时给出错误提示。"]),
    ("数据埋点：记录点击“立即购买”按钮的次数和来源页面。", ["埋点需求：统计“立即购买”按钮点击量及来源。"]),
    ("风险：第三方短信服务可能出现延迟。", ["风险点：短信供应商存在延迟风险。"]),
    ("好的", ["好的"]),
    ("完全不同的一句话", ["毫无关系的另一个句子"]),
    ("中", ["中文"]),
    # Mixed Chinese and English
    ("本版本新增iOS和Android双端支持，API版本升级到v2.1。", ["新版本支持iOS与Android两端，API升级至v2.1。"]),
    ("使用Redis缓存热点数据，TTL设置为300秒。", ["热点数据采用Redis缓存，TTL为300s。"]),
    ("PRD评审会议定于周三下午3点，参会人：PM、RD、QA。", ["PRD评审会在周三15:00，参会：PM/RD/QA。"]),
    ("支持OAuth 2.0登录（Google、GitHub）。", ["支持通过OAuth2.0使用Google或GitHub账号登录。"]),
    ("Dashboard 页面展示 DAU、MAU 和留存率 retention rate。", ["Dashboard展示DAU/MAU以及留存率。"]),
    ("用户可上传JPG/PNG格式图片，大小不超过5MB。", ["图片支持JPG、PNG，单张不超过5MB。"]),
    # Empty and whitespace
    ("", ["The reference is not empty."]),
    ("The prediction is not empty.", [""]),
    ("", [""]),
    ("   ", ["   "]),
    ("\t tabs and  spaces \t", ["tabs and spaces"]),
    # Unicode edge cases
    ("Caf\u00e9 na\u00efve r\u00e9sum\u00e9 \u2014 d\u00e9j\u00e0 vu\u2026", ["Cafe naive resume - deja vu..."]),
    ("\u201cSmart quotes\u201d and \u2018single\u2019 ones \u2013 en dash", ["\"Smart quotes\" and 'single' ones - en dash"]),
    ("Emoji test \U0001F600\U0001F680 launch \u2705", ["Emoji test \U0001F680 launch"]),
    ("\uff21\uff22\uff23\uff11\uff12\uff13\uff0c\u5168\u89d2\u5b57\u7b26\uff01", ["ABC123,\u5168\u89d2\u5b57\u7b26!"]),
    ("\u039f\u0394\u03a5\u03a3\u03a3\u0395\u03a5\u03a3 \u03a3\u039f\u03a6\u039f\u03a3", ["\u03bf\u03b4\u03c5\u03c3\u03c3\u03b5\u03c5\u03c2 \u03c3\u03bf\u03c6\u03bf\u03c2"]),
    ("\u0130stanbul KELVIN \u212a sign", ["istanbul kelvin k sign"]),
    ("non\u00a0breaking\u2009thin\u3000ideographic spaces", ["non breaking thin ideographic spaces"]),
    ("zero\u200bwidth\u200cjoiners\u200d here", ["zerowidthjoiners here"]),
    ("info\x1cseparator\x1dchars\x1e\x1fend", ["info separator chars end"]),
    ("\u65e5\u672c\u8a9e\u306e\u6587\u7ae0\u3067\u3059\u3002\u30ab\u30bf\u30ab\u30ca", ["\u65e5\u672c\u8a9e\u306e\u6587\u3067\u3059\u3002"]),
    ("\ud55c\uad6d\uc5b4 \ubb38\uc7a5\uc785\ub2c8\ub2e4.", ["\ud55c\uad6d\uc5b4 \ubb38\uc7a5\uc774\uc5d0\uc694."]),
    ("\u0645\u0631\u062d\u0628\u0627 \u0628\u0627\u0644\u0639\u0627\u0644\u0645", ["\u0645\u0631\u062d\u0628\u0627 \u064a\u0627 \u0639\u0627\u0644\u0645"]),
    ("e\u0301 combining acute vs \u00e9 precomposed", ["\u00e9 precomposed vs e\u0301 combining"]),
    ("Math \u2211 \u221a2 \u2248 1.414 \u00b1 0.001 \u2192 \u221e", ["Math sum sqrt2 ~ 1.414 +- 0.001 -> inf"]),
    ("\u2460\u2461\u2462 \u00bd \u00b2 numbers", ["1 2 3 1/2 2 numbers"]),
    ("Tab\u2003em\u2002en\u2001quad spaces", ["Tab em en quad spaces"]),
]

PORTER_WORDS = """
caresses ponies ties caress cats feed agreed disabled matting mating meeting milling messing
meetings happy sky skies dying lying tying news innings inning outings outing cannings canning
howe proceed exceed succeed relational conditional rational valenci hesitanci digitizer
conformabli radicalli differentli vileli analogousli vietnamization predication operator
feudalism decisiveness hopefulness callousness formaliti sensitiviti sensibiliti triplicate
formative formalize electriciti electrical hopeful goodness revival allowance inference airliner
gyroscopic adjustable defensible irritant replacement adjustment dependent adoption homologou
communism activate angulariti homologous effective bowdlerize probate rate cease controll roll
generalizations generalization general oscillators running runners ran quickly connected
connections connecting connectivity studies study studying agreement agreements y yy yyy
syzygy toy toys crying cry tries trying fully fulli fullness logi apologi analogi archaeology
hopping hoping hopped hoped filing filling falling fall fizzed fizzing sized size bled bleed
requirements requirement users user login logins verification verifying verified
""".split()


class JiebaTokenizer:
    """rouge-score tokenizer: jieba precise mode, lower-cased, keeping segments with a letter
    or digit."""

    def tokenize(self, text):
        return [t.lower() for t in jieba.lcut(text) if any(c.isalnum() for c in t)]


def bleu_stats(score):
    return {
        "score": score.score,
        "counts": [float(c) for c in score.counts],
        "totals": [float(t) for t in score.totals],
        "precisions": list(score.precisions),
        "bp": score.bp,
        "sys_len": score.sys_len,
        "ref_len": score.ref_len,
    }


def rouge_dict(scores):
    return {k: [v.precision, v.recall, v.fmeasure] for k, v in scores.items()}


def main():
    jieba.setLogLevel(60)
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "pairs.jsonl", "w", encoding="utf-8") as f:
        for i, (prediction, references) in enumerate(PAIRS):
            f.write(json.dumps({"id": i, "prediction": prediction, "references": references}, ensure_ascii=False) + "\n")

    hyps = [p for p, _ in PAIRS]
    max_refs = max(len(r) for _, r in PAIRS)
    streams = [[r[k] if k < len(r) else None for _, r in PAIRS] for k in range(max_refs)]

    bleu = {}
    for tokenize in ["13a", "zh", "intl", "char", "none"]:
        for lowercase in [False, True]:
            key = tokenize + ("-lc" if lowercase else "")
            entry = {"corpus": {}, "sentence": {}}
            for smooth in ["none", "floor", "add-k", "exp"]:
                corpus = sacrebleu.corpus_bleu(hyps, streams, smooth_method=smooth, tokenize=tokenize, lowercase=lowercase)
                entry["corpus"][smooth] = bleu_stats(corpus)
                entry["sentence"][smooth] = [
                    sacrebleu.sentence_bleu(p, r, smooth_method=smooth, tokenize=tokenize, lowercase=lowercase).score
                    for p, r in PAIRS
                ]
            # Corpus BLEU with effective order, for completeness.
            entry["corpus"]["exp-effective"] = bleu_stats(
                sacrebleu.corpus_bleu(hyps, streams, tokenize=tokenize, lowercase=lowercase, use_effective_order=True))
            bleu[key] = entry

    types = ["rouge1", "rouge2", "rougeL", "rougeLsum"]
    rouge = {}
    for name, scorer in [
        ("default", rouge_scorer.RougeScorer(types, use_stemmer=False)),
        ("default-stem", rouge_scorer.RougeScorer(types, use_stemmer=True)),
        ("jieba", rouge_scorer.RougeScorer(types, tokenizer=JiebaTokenizer())),
    ]:
        per_pair = [rouge_dict(scorer.score_multi(r, p)) for p, r in PAIRS]
        mean = {t: [float(np.mean([s[t][i] for s in per_pair])) for i in range(3)] for t in types}
        rouge[name] = {"pairs": per_pair, "mean": mean}

    stemmer = porter.PorterStemmer()
    texts = sorted({t for p, r in PAIRS for t in [p, *r]})
    reference = {
        "generated_by": "tools/make_metric_fixtures.py",
        "versions": {
            "python": platform.python_version(),
            "sacrebleu": sacrebleu.__version__,
            "rouge_score": getattr(rouge_score, "__version__", "0.1.2"),
            "nltk": nltk.__version__,
            "jieba": jieba.__version__,
        },
        "bleu": bleu,
        "rouge": rouge,
        "porter": {w: stemmer.stem(w) for w in PORTER_WORDS},
        "jieba": {t: jieba.lcut(t) for t in texts},
    }
    with open(OUT / "reference.json", "w", encoding="utf-8") as f:
        json.dump(reference, f, ensure_ascii=False, indent=1, sort_keys=True)
        f.write("\n")
    print(f"wrote {len(PAIRS)} pairs to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
