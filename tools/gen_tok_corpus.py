#!/usr/bin/env python3
"""Writes the texts of the tokenizer corpus (a JSON list of strings) to stdout.

usage: python3 tools/gen_tok_corpus.py > texts.json
       node tools/tok_corpus_ref.js tokenizer.json texts.json > test/tokenizer-corpus.json

Hand-written samples (many scripts, code, URLs, prompts, contractions, special-token
look-alikes, normalization cases) plus seeded random strings drawn from pools of characters that
stress the pre-tokenizer regex (every kind of white space, digits of many scripts, marks,
emoji sequences, Unicode 16 letters) and NFC (decomposed letters, Hangul jamo, marks out of
order). Deterministic: the same output on every run.
"""
import json, random, sys

SCRIPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Portez ce vieux whisky au juge blond qui fume. Ça va? Où êtes-vous?",
    "Falsches Üben von Xylophonmusik quält jeden größeren Zwerg. Straße, Maß, ẞ",
    "El pingüino Wenceslao hizo kilómetros bajo exhaustiva lluvia y frío, añoraba a su querido cachorro. ¿Qué? ¡Sí!",
    "À noite, vovô Kowalsky vê o ímã cair no pé do pinguim queixoso e vovó põe açúcar no chá de tâmaras.",
    "Quel fez sghembo copre davanti. Perché? Così è.",
    "Pchnąć w tę łódź jeża lub ośm skrzyń fig. Zażółć gęślą jaźń.",
    "Příliš žluťoučký kůň úpěl ďábelské ódy.",
    "Pijamalı hasta yağız şoföre çabucak güvendi. İstanbul, ılık, IĞDIR",
    "Tiếng Việt có dấu: Người ta nói rằng trăm năm trong cõi người ta.",
    "Съешь же ещё этих мягких французских булок, да выпей чаю.",
    "Чуєш їх, доцю, га? Кумедна ж ти, прощайся без ґольфів!",
    "Ξεσκεπάζω την ψυχοφθόρα βδελυγμία. Καλημέρα κόσμε!",
    "Բարեւ աշխարհ: Հայերեն լեզու",
    "გამარჯობა მსოფლიო, ქართული ენა",
    "שלום עולם! זוהי בדיקה של עברית עם ניקוד: בְּרֵאשִׁית בָּרָא",
    "مرحبا بالعالم! هذه جملة عربية مع تشكيل: بِسْمِ ٱللَّٰهِ ٱلرَّحْمَٰنِ ٱلرَّحِيمِ ١٢٣",
    "سلام دنیا، این یک جمله فارسی است. ۱۲۳۴",
    "ہیلو دنیا، یہ اردو ہے",
    "नमस्ते दुनिया! यह हिन्दी का वाक्य है। १२३ क़ ख़ ग़",
    "ওহে বিশ্ব! এটি বাংলা। ১২৩",
    "ਸਤਿ ਸ੍ਰੀ ਅਕਾਲ ਦੁਨੀਆ ੧੨੩",
    "હેલો વિશ્વ ૧૨૩",
    "ନମସ୍କାର ବିଶ୍ୱ",
    "வணக்கம் உலகம்! தமிழ் ௧௨௩",
    "హలో ప్రపంచం ౧౨౩",
    "ಹಲೋ ವಿಶ್ವ ೧೨೩",
    "ഹലോ ലോകം ൧൨൩",
    "ආයුබෝවන් ලෝකය",
    "สวัสดีชาวโลก ภาษาไทยไม่มีการเว้นวรรคระหว่างคำ ๑๒๓",
    "ສະບາຍດີໂລກ ໑໒໓",
    "བཀྲ་ཤིས་བདེ་ལེགས། ༡༢༣",
    "မင်္ဂလာပါ ကမ္ဘာ ၁၂၃",
    "សួស្តី​ពិភពលោក ១២៣",
    "ᠮᠣᠩᠭᠣᠯ ᠪᠢᠴᠢᠭ᠌",
    "ሰላም ለዓለም! ፩፪፫",
    "ᏣᎳᎩ ᎦᏬᏂᎯᏍᏗ",
    "ᐊᐃᓐᓇᐅᔪᖅ ᐃᓄᒃᑎᑐᑦ",
    "你好，世界！这是一个简体中文句子。一只可爱的小猫坐在窗台上，看着外面的雨。",
    "繁體中文：我們今天去臺灣的夜市吃東西，好熱鬧喔！",
    "日本語の文章です。ひらがな、カタカナ、漢字が混ざっています。ｶﾀｶﾅ半角も。",
    "한국어 문장입니다. 안녕하세요, 세계! 다람쥐 헌 쳇바퀴에 타고파.",
    "ꆈꌠꁱꂷ ꀊꆨꌠ",
    "ⵜⴰⵎⴰⵣⵉⵖⵜ ⵜⴰⵏⴰⵡⴰⵢⵜ",
    "ߒߞߏ ߞߊ߲ ߕߍߓߍ",
    "ꦲꦏ꧀ꦱꦫꦗꦮ",
    "ᚠᚢᚦᚨᚱᚲ ᚷᚹᚺᚾ ᛁᛃ",
    "᚛ᚑᚌᚐᚋ᚜",
    "𐌲𐌿𐍄𐌹𐍃𐌺 𐍂𐌰𐌶𐌳𐌰",
    "𒀭𒂗𒍪 𓀀𓁐𓂀 𐀀𐀁𐀂",
    "𐐔𐐯𐑅𐐨𐑉𐐯𐐻 𐑖𐑷𐑝𐑾𐑯",
    "𝐌𝐚𝐭𝐡 𝑏𝑜𝑙𝑑 𝔉𝔯𝔞𝔨𝔱𝔲𝔯 𝟙𝟚𝟛 ℝ ℕ ∀x∈ℝ: x²≥0",
    "ＦＵＬＬＷＩＤＴＨ　ｌｅｔｔｅｒｓ　１２３！？",
    "Ⅰ Ⅱ Ⅻ ⅻ ① ② ⑳ ½ ¾ ⅞ ² ³ ¹ ₀ ₁ ₂ 〇 〡〢〣",
    "Unicode 16: Ᲊ ᲊ 𐵐𐵑𐵒 𐵀𐵁𐵂 𑛐𑛑 𖄀𖄁 𞗐𞗑",
]

PROMPTS = [
    "A photo of a cat sitting on a windowsill, golden hour, 35mm film",
    "masterpiece, best quality, ultra-detailed, 8k, (cinematic lighting:1.2), portrait of a young woman in Hanfu",
    "A watercolor painting of Kyoto in spring — cherry blossoms, a red torii gate & a quiet river.",
    "Poster with the text \"OPEN 24/7\" in neon letters, cyberpunk street at night, rain reflections",
    "一位身穿红色汉服的年轻女子站在古老的城墙上，背景是夕阳和远山，电影感，超高清",
    "Logo design: the word 'ZIMAGE' in bold sans-serif, flat vector, #FF5733 on white",
    "isometric 3D render of a tiny island with a lighthouse; low-poly; pastel colours; 4K",
    "A sign that says \"Hello 2025!\" held by a robot, studio photo, f/1.8, 1/250s, ISO 100",
    "Negative: blurry, lowres, bad anatomy, extra fingers, watermark, text, jpeg artifacts",
]

CODE = [
    "int main(void) {\n    printf(\"Hello, world!\\n\");\n    return 0;\n}\n",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\nprint([f(i) for i in range(10)])",
    "const add = (a, b) => a + b;\nconsole.log(`sum=${add(1, 2)}`); // 3",
    "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"></head><body><p class='x'>Hi &amp; bye</p></body></html>",
    "{\"key\": [1, 2.5, -3e10, true, null], \"nested\": {\"a\": \"b\\u00e9\"}}",
    "SELECT name, COUNT(*) AS n FROM users WHERE age >= 18 GROUP BY name HAVING n > 1 ORDER BY n DESC;",
    "#!/bin/sh\nset -euo pipefail\nfor f in *.txt; do echo \"$f\" | tr a-z A-Z >> out.log 2>&1; done",
    "fn main() { let v: Vec<u8> = vec![0xFF, 0b1010, 0o17]; println!(\"{:?}\", v); }",
    "x = a[i][j] + b->c.d * (e / f) % g ^ h | ~i && !j || k != l <= m >> 2 << 3;",
    "    indented\n        more\n\t\ttabs\n  \t mixed \t  \n",
    "```python\nimport numpy as np\narr = np.zeros((3, 3))\n```\n| a | b |\n|---|---|\n| 1 | 2 |",
    "# Title\n\n* item 1\n* item 2\n\n> quote\n\n**bold** _italic_ `code` [link](http://x.y)",
    "LaTeX: $\\int_0^\\infty e^{-x^2}\\,dx = \\frac{\\sqrt{\\pi}}{2}$ and \\begin{align} a &= b \\\\ c &= d \\end{align}",
]

URLS = [
    "https://example.com/path/to/page?query=1&other=two#section-3",
    "http://user:pass@sub.domain.co.uk:8080/a_b-c.d~e/%20%E2%9C%93?x[]=1;y=2",
    "mailto:someone.name+tag@example.org",
    "ftp://files.example.net/pub/file-v1.2.3.tar.gz",
    "www.測試.com/路径?查询=值 and https://ja.wikipedia.org/wiki/日本語",
    "C:\\Users\\Name\\Documents\\file (1).txt and /usr/local/bin/python3.11",
    "git@github.com:owner/repo.git, ssh://host:22/~user/dir/",
    "192.168.0.1:443, [2001:db8::1]:80, 10.0.0.255/24",
]

CONTRACTIONS = [
    "don't won't can't shouldn't I'm you're he's she'd we'll they've it's",
    "DON'T WON'T I'M YOU'RE HE'S SHE'D WE'LL THEY'VE IT'S",
    "DoN't I'm YoU'rE hE's ShE'd We'Ll ThEy'Ve 'S 'T 'Re 'vE 'M 'lL 'D",
    "y'all 'twas rock'n'roll O'Neil ma'am o'clock fo'c's'le ne'er-do-well",
    "it’s don’t I’m (curly apostrophes U+2019) and ‘quoted’ «guillemets» „Anführung“",
    "''s '''t ''re 's's 't't 'sss 'llama 'dude 'merge 'reveal 'vex 'tea",
    "'ſ 'ſt 'K 'ß 'İ 'ı 'ﬅ 'ǅ 'Ss 'SS",
    "'", "''", "'s", "'S", "'ll", "'LL", "'Ll", "'lL", "'re", "'RE", "'ve", "'d", "'m", "'t", "'x",
    "' s", "'\ns", "'1", "'’s", "a's", "1's", "!'s", " 's", "  's", "\n's", "'ſ", "'ſa",
]

SPECIAL = [
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start|>user\nhi<|im_end|>",
    "<|im_start", "im_start|>", "<|im_end", "<|im_end|", "|im_end|>", "<|im_start|><|im_end|>",
    "<|im_start|><|im_start|><|im_end|><|im_end|>", "<<|im_start|>>", "<|<|im_end|>|>",
    "word<|im_end|>word", "word <|im_end|> word", "  <|im_end|>  ", "\n<|im_end|>\n",
    "<|endoftext|><|endoftext|>text", "x<|endoftext|>y", "<think></think>", "<think>\n\n</think>\n\n",
    "<tool_call>{\"a\":1}</tool_call>", "<tool_response>ok</tool_response>", "<|fim_prefix|>a<|fim_middle|>b<|fim_suffix|>c<|fim_pad|>",
    "<|repo_name|>x<|file_sep|>y", "<|object_ref_start|><|object_ref_end|><|box_start|><|box_end|><|quad_start|><|quad_end|>",
    "<|vision_start|><|vision_end|><|vision_pad|><|image_pad|><|video_pad|>", "<|IM_START|>", "<|im start|>",
    "< |im_start| >", "<|im_start|ok>", "<|im_start||>", "<||im_start|>", "<|im_start|>" * 5,
    "<think>thinking</thinking>", "</think >", "<think/>", "<|endoftext|", "|endoftext|>",
    "e\u0301<|im_end|>\u0301", "한<|im_end|>\u11a8", "\u1100<|im_end|>\u1161",
]

NORMALIZE = [
    "e\u0301", "E\u0301\u0301", "a\u0308\u0301", "a\u0301\u0308", "o\u0323\u0302", "o\u0302\u0323",
    "A\u030a", "\u212b", "\u2126", "\u212a", "\u00c5\u0323", "q\u0307\u0323", "\u1e0b\u0323",
    "\u1100\u1161", "\u1100\u1161\u11a8", "\uac00\u11a8", "\u1100\u1161\u11a8\u1100\u1161",
    "\u1112\u1161\u11ab\u1100\u116e\u11af", "\u110b\u1175\u11c2 \u1100", "\u11a8\u1161\u1100",
    "\uf900\uf901 \uf9ff", "\u0958 \u0915\u093c", "\u0f73 \u0f75 \u0f81", "\u0344 \u0340 \u0341 \u0343",
    "\u1dfa", "a\u1dfa\u0316", "a\u0316\u1dfa", "\u11930\u11935", "\U00011935\U00011930", "\U000105d2\u0307",
    "a" + "\u0301\u0316\u0300\u0317\u0302\u0318" * 12 + "b",
    "x" + "".join(chr(0x300 + i) for i in range(112)) + "y",
    "Zalgo: H\u0335\u0321\u0322\u0327\u0328\u031b\u0300\u0301\u0302e\u0336\u0337\u0338\u0339\u033al\u0340\u0341l\u0342\u0343o\u0344\u0345",
    "\u0041\u030a\u0301 \u00c5\u0301 \u01fa", "\u03a9\u0301 \u2126\u0301 \u1ff3\u0301", "\u0627\u0653 \u0627\u0654 \u0648\u0654",
    "\u0b47\u0b3e \u0b47\u0b57 \u0bc6\u0bbe \u0cc6\u0cd5", "\u1025\u102e", "\u3099\u304b\u3099 \u304c \u30cf\u309a",
    "\u0ddd \u0dd9\u0dcf\u0dca", "\u05e9\u05c1\u05bc \u05e9\u05bc\u05c1", "\u00e9\u0301", "\u1e9b\u0323", "\u017f\u0307",
]

WHITE = ["\t", "\n", "\x0b", "\x0c", "\r", " ", "\x85", "\xa0", "\u1680", "\u2000", "\u2001", "\u2002",
         "\u2003", "\u2004", "\u2005", "\u2006", "\u2007", "\u2008", "\u2009", "\u200a", "\u2028", "\u2029",
         "\u202f", "\u205f", "\u3000"]
NOT_WHITE = ["\u180e", "\u200b", "\u200c", "\u200d", "\u2060", "\ufeff", "\x1c", "\x1d", "\x1e", "\x1f",
             "\x00", "\x01", "\x7f", "\x80", "\x9f", "\xad", "\u061c", "\u200e", "\u200f", "\u202a", "\u202e"]
DIGITS = ["0123456789", "٠١٢٣٤٥٦٧٨٩", "۰۱۲۳۴۵۶۷۸۹", "०१२३४५६७८९", "০১২৩৪৫৬৭৮৯", "๐๑๒๓๔๕๖๗๘๙",
          "０１２３４５６７８９", "𝟎𝟏𝟐𝟑𝟒", "①②③④⑤", "ⅠⅡⅢⅣⅤ", "¹²³⁴⁵", "₀₁₂₃₄", "½¼¾⅓", "〇〡〢",
          "𐵀𐵁𐵂", "𑛐𑛑𑛒", "፩፪፫", "߀߁߂", "᠐᠑᠒", "꘠꘡꘢"]
EMOJI = ["😀", "🐶", "🐱", "🚀", "❤️", "❤", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "🇯🇵", "🇺🇸🇬🇧", "🧑🏿‍🦱",
         "☺︎", "✌🏻", "🫠", "🤌🏼", "🏴󠁧󠁢󠁳󠁣󠁴󠁿", "1️⃣", "#️⃣", "©️", "™", "♀️", "👁‍🗨", "🦶🏾", "🧬", "🪐"]
PUNCT = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~") + ["…", "—", "–", "·", "•", "§", "¶", "†", "‡",
         "«", "»", "„", "“", "”", "‘", "’", "¿", "¡", "。", "、", "，", "！", "？", "：", "；", "「", "」",
         "『", "』", "【", "】", "《", "》", "〜", "※", "€", "£", "¥", "₹", "₿", "°", "±", "×", "÷", "∞",
         "≠", "≈", "→", "⇒", "∑", "√", "∫", "■", "□", "▲", "●", "★", "☆", "♪", "♫", "✓", "✗", "\ue000",
         "\U000f0000", "\ufffd", "\ufffe", "\uffff", "\U0010ffff", "\U000e0001", "\U000e007f"]
MARKS = ["\u0300", "\u0301", "\u0302", "\u0303", "\u0308", "\u030a", "\u0316", "\u0323", "\u0327", "\u0345",
         "\u05b0", "\u064b", "\u0670", "\u093c", "\u094d", "\u0e31", "\u0e48", "\u302a", "\u3099", "\u20dd",
         "\ufe0f", "\ufe0e", "\U000e0100", "\u1ab0", "\u1dfa", "\U0001e4ec"]
WORDS = ["hello", "world", "The", "cat", "DOG", "naïve", "café", "résumé", "Straße", "ΑΒΓ", "Москва", "東京",
         "서울", "ไทย", "עברית", "عربي", "हिन्दी", "a", "I", "x", "ab", "ABC", "camelCase", "snake_case",
         "kebab-case", "ALLCAPS", "MiXeD", "ǅemal", "ǈ", "ﬁnance", "ﬀ", "Ⓐⓑ", "ᴬᴮ", "ᵃ", "ª", "º", "µ", "ß",
         "ĳ", "ŉ", "ǆ", "ǰ", "İ", "ı", "ſ", "K", "Å", "Ω", "ℵ", "ℓ", "℘", "ⅈ", "Ᲊ", "ᲊ", "𐵐", "\u1100\u1161",
         "\u110b\u1175\u11c2", "가", "각", "\u3131", "\uffa1", "\u11a8"]


def rand_piece(rng):
    kind = rng.randrange(12)
    if kind == 0: return rng.choice(WHITE) * rng.choice([1, 1, 1, 2, 3, 7])
    if kind == 1: return rng.choice(NOT_WHITE)
    if kind == 2: d = rng.choice(DIGITS); return "".join(rng.choice(d) for _ in range(rng.randint(1, 6)))
    if kind == 3: return rng.choice(EMOJI)
    if kind == 4: return rng.choice(PUNCT) * rng.choice([1, 1, 2, 3])
    if kind == 5: return rng.choice(MARKS)
    if kind == 6: return rng.choice(["\r\n", "\n\n", "\r", "\n \n", " \r\n ", "\n\t", "\t\n"])
    if kind == 7: return "'" + rng.choice(["s", "S", "t", "re", "RE", "ve", "m", "ll", "LL", "d", "ſ", "x", ""])
    if kind == 8: return rng.choice(["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<|im_",
                                     "|>", "<|", "<tool_call>", "<|fim_pad|>"])
    return rng.choice(WORDS)


def random_text(rng, n):
    return "".join(rng.choice(["", "", " ", " "]) + rand_piece(rng) for _ in range(n))


def main():
    rng = random.Random(20251127)
    texts = SCRIPTS + PROMPTS + CODE + URLS + CONTRACTIONS + SPECIAL + NORMALIZE
    # every white-space and not-white-space character in every position relative to words
    for w in WHITE + NOT_WHITE:
        texts += [w, w * 2, w * 3, "a" + w + "b", "a" + w * 2 + "b", w + "a", "a" + w, w + " a",
                  "a " + w, w + "\n", "\n" + w + "x", "1" + w + "2", "!" + w + "!", w + "'s", w + "<|im_end|>"]
    for d in DIGITS:
        texts += [d, "x" + d + "y", " " + d, "v" + d[:2] + "." + d[2:], d + "%"]
    for e in EMOJI:
        texts += [e, "I " + e + " it", e * 3, e + "\u200d" + e, "a" + e + "b"]
    for m in MARKS:
        texts += [m, "a" + m, " " + m, m + "a", "1" + m, "!" + m + "!", "\u1100" + m + "\u1161", "e" + m + "\u0301"]
    # runs: spaces, newlines, punctuation, letters, digits
    for n in [1, 2, 3, 4, 5, 8, 15, 16, 17, 31, 32, 33, 64, 100, 257]:
        texts += [" " * n, "\n" * n, "\r\n" * n, " " * n + "x", "x" + " " * n + "y", "x" + "\n" * n,
                  "\t" * n + "a", "!" * n, "." * n, "-" * n, "=" * n, "#" * n, "a" * n, "1" * n,
                  " \n" * n, "\n " * n, "ab" * n, "🙂" * n, "。" * n, "\u3000" * n + "x"]
    texts += ["a" * 1000, "ab" * 700, "abc " * 300, "z" * 3000, "9" * 500, " " * 2000, "\n" * 1000,
              "supercalifragilisticexpialidocious" * 30, "lo" + "o" * 500 + "ng", "-" * 1000 + ">"]
    # Unicode 16 letters and numbers next to ASCII (regex class boundaries)
    for c in ["\u1c89", "\u1c8a", "\U00010d4a", "\U00010d40", "\U0001e5d0", "\U00011f04", "\U0002ebf0",
              "\U000323b0", "\U00010940", "\U00016ea0", "\u0378", "\U000e01f0"]:
        texts += [c, "a" + c, c + "1", " " + c, "!" + c, c + c]
    # random mixtures
    while len(texts) < 2600:
        texts.append(random_text(rng, rng.choice([1, 2, 3, 5, 8, 13, 21, 40])))
    for _ in range(6):
        texts.append(random_text(rng, 600))
    # decode cases: random ids, including single bytes that make invalid UTF-8
    decode = [[rng.randrange(151669) for _ in range(rng.randint(1, 12))] for _ in range(150)]
    decode += [[rng.choice(range(94, 256)) for _ in range(rng.randint(1, 6))] for _ in range(100)]
    decode += [[151644], [151643, 151645], [], [0], [220, 220], [32, 151644, 33]]
    json.dump({"texts": texts, "decode": decode}, sys.stdout, ensure_ascii=False)


if __name__ == "__main__":
    main()
