// A tiny tokenizer.json with added tokens of every flag (single_word, lstrip, rstrip,
// normalized) and "a b" string merges, plus HF `tokenizers`' ids for texts that exercise them.
//
// usage: node tools/tok_flags_ref.js test/tokenizer-flags.json > test/tokenizer-flags-cases.json
// (needs `npm install tokenizers`; the test reads both files).
const fs = require('fs');
const { Tokenizer } = require('tokenizers');

function bytesToUnicode() {           // GPT-2's alphabet, in id order
  const bs = [];
  for (let b = 0x21; b <= 0x7e; b++) bs.push(b);
  for (let b = 0xa1; b <= 0xac; b++) bs.push(b);
  for (let b = 0xae; b <= 0xff; b++) bs.push(b);
  const cs = bs.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) if (!bs.includes(b)) { bs.push(b); cs.push(256 + n++); }
  return cs.map(c => String.fromCodePoint(c));
}

const vocab = {};
bytesToUnicode().forEach((c, i) => { vocab[c] = i; });
['he', 'Ġt', 'Ġthe', 'll', 'llo'].forEach((t, i) => { vocab[t] = 256 + i; });
const merges = ['h e', 'Ġ t', 'Ġt he', 'l l', 'll o'];
const added = [
  ['[SW]', { single_word: true }], ['<L>', { lstrip: true }], ['<R>', { rstrip: true }],
  ['<LR>', { lstrip: true, rstrip: true }], ['cafe\u0301', { normalized: true, special: false }],
  ['<N>', {}], ['\u212b', { normalized: true, special: false }], ['<|x|>', {}], ['<|x|>y', {}],
  ['[SW2]', { single_word: true, lstrip: true }], ['he', { normalized: true, special: false, single_word: true }],
// The "id" fields are deliberately wrong: HF ignores them (an added token takes its vocab id, or
// the next id after the vocab), and so must we.
].map(([content, f], i) => Object.assign({ id: 300 + i, content, single_word: false, lstrip: false,
  rstrip: false, normalized: false, special: true }, f));
const qwen = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";
const bl = { type: 'ByteLevel', add_prefix_space: false, trim_offsets: false, use_regex: false };
const json = {
  version: '1.0', truncation: null, padding: null, added_tokens: added, normalizer: { type: 'NFC' },
  pre_tokenizer: { type: 'Sequence', pretokenizers: [
    { type: 'Split', pattern: { Regex: qwen }, behavior: 'Isolated', invert: false }, bl] },
  post_processor: bl, decoder: bl,
  model: { type: 'BPE', dropout: null, unk_token: null, continuing_subword_prefix: '', end_of_word_suffix: '',
    fuse_unk: false, byte_fallback: false, ignore_merges: false, vocab, merges },
};
fs.writeFileSync(process.argv[2], JSON.stringify(json));

const texts = [
  'the [SW] x', 'the[SW]x', 'a [SW]', '[SW] a', '[SW]', 'é[SW]', '_[SW]', '1[SW]', '-[SW]-', '[SW][SW]', '[SW]\u0301',
  'a   <L>b', 'a\t\n <L>', '<L>', '  <L>  ', 'x <R>   y', '<R>\n\nz', 'a  <LR>  b', '<LR> <LR>  <LR>',
  ' <R> <L> ', '<R><L>', 'un cafe\u0301 noir', 'un café noir', 'cafe\u0301\u0301', 'cafe', '<N>cafe\u0301<N>',
  '\u212b \u00c5 A\u030a', '<|x|>y <|x|>z <|x|', 'the hello he xhe hex [SW2] a  [SW2]b  [SW2] c', 'he', 'he he', 'the',
  'hello\u0301 he\u0301 h\u00e9', '<N>', 'a<N>b', '[SW2]', ' [SW2]', 'x [SW2]', 'x\u3000[SW2]', 'hé [SW] hé',
];
(async () => {
  const tok = Tokenizer.fromFile(process.argv[2]);
  const cases = [];
  for (const text of texts) {
    const ids = (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
    cases.push(JSON.stringify({ text, ids, decoded: await tok.decode(ids, false) }));
  }
  process.stdout.write('[\n' + cases.join(',\n') + '\n]\n');
})();
