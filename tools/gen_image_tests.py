#!/usr/bin/env python3
"""Generates the image test data in test/data/ (committed; rerun only to change it).

PNG (test/data/png/): every colour type and bit depth, plain and Adam7-interlaced, written
here with Python's zlib and a per-row random filter; NAME.ppm holds the RGB the reader must
return, computed independently: sub-byte gray scaled by replication, 16-bit samples -> high
byte, palette looked up (tRNS ignored), alpha dropped without compositing (PIL's
convert("RGB")).

Exception, following PIL: 16-bit gray opens as mode "I" and convert("RGB") clips the 16-bit
value to 255 (so the expected value is min(v, 255), not the high byte).

JPEG (test/data/jpeg/): a synthetic picture encoded with libjpeg-turbo's cjpeg in several
modes; NAME.ppm is djpeg's decoding with its defaults (islow IDCT, fancy upsampling), i.e.
what PIL returns. Needs cjpeg/djpeg (Debian: libjpeg-turbo-progs).

Resize (test/data/resize/, needs PIL): src.png and, per target TWxTH, DiffSynth's
crop_and_resize of it made with PIL.

When PIL is importable every expected PNG/JPEG decoding is also checked against PIL's
Image.open(f).convert("RGB"). Run with Debian's python (apt-get install python3-pil
libjpeg-turbo-progs):

usage: /usr/bin/python3 tools/gen_image_tests.py   (from the repository root)
"""
import os, random, struct, subprocess, zlib
try:
    from PIL import Image
except ImportError:
    Image = None

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "data")


def chunk(t, data):
    return struct.pack(">I", len(data)) + t + data + struct.pack(">I", zlib.crc32(t + data) & 0xffffffff)


def ppm(w, h, rgb):
    return b"P6\n%d %d\n255\n" % (w, h) + bytes(rgb)


def paeth(a, b, c):
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def filter_row(f, cur, prev, bpp):
    out = bytearray(len(cur))
    for i in range(len(cur)):
        a = cur[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pred = [0, a, b, (a + b) // 2, paeth(a, b, c)][f]
        out[i] = (cur[i] - pred) & 255
    return out


def pack_row(samples, depth):
    if depth == 8:
        return bytearray(samples)
    if depth == 16:
        return bytearray(b"".join(struct.pack(">H", s) for s in samples))
    out, acc, n = bytearray(), 0, 0
    for s in samples:
        acc = (acc << depth) | s
        n += depth
        if n == 8:
            out.append(acc); acc = n = 0
    if n:
        out.append(acc << (8 - n))
    return out


ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def make_png(name, w, h, ctype, depth, interlace, rng):
    chans = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[ctype]
    maxv = (1 << depth) - 1
    npal = 0
    if ctype == 3:
        npal = rng.randint(2, 1 << depth)
        pal = [tuple(rng.randrange(256) for _ in range(3)) for _ in range(npal)]
    # the image: samples[y][x] = tuple of channel values
    # 16-bit gray: half the samples below 256, where PIL's clipping (below) keeps the value
    top = npal if ctype == 3 else 511 if (ctype, depth) == (0, 16) else maxv + 1
    img = [[tuple(rng.randrange(top) if (x + y) % 2 else rng.randrange(maxv + 1 if ctype != 3 else npal)
                  for _ in range(chans)) for x in range(w)] for y in range(h)]
    # expected RGB
    rgb = []
    for y in range(h):
        for x in range(w):
            s = img[y][x]
            if ctype == 3:
                rgb += pal[s[0]]
            elif (ctype, depth) == (0, 16):
                rgb += [min(s[0], 255)] * 3  # PIL: mode "I", convert("RGB") clips to 255
            else:
                v = [(c >> 8) if depth == 16 else (c * (255 // maxv)) for c in s]
                rgb += [v[0]] * 3 if ctype in (0, 4) else v[:3]
    passes = ADAM7 if interlace else [(0, 0, 1, 1)]
    bpp = max(1, chans * depth // 8)
    raw = bytearray()
    for (x0, y0, dx, dy) in passes:
        xs, ys = list(range(x0, w, dx)), list(range(y0, h, dy))
        if not xs or not ys:
            continue
        prev = None
        for y in ys:
            row = pack_row([c for x in xs for c in img[y][x]], depth)
            if prev is None:
                prev = bytearray(len(row))
            f = rng.randrange(5)
            raw += bytes([f]) + filter_row(f, row, prev, bpp)
            prev = row
    z = zlib.compress(bytes(raw), 9)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, depth, ctype, 0, 0, interlace))
    out += chunk(b"tEXt", b"Comment\0test image")
    if ctype == 3:
        out += chunk(b"PLTE", bytes(c for p in pal for c in p))
        out += chunk(b"tRNS", bytes(rng.randrange(256) for _ in range(npal)))
    for i in range(0, len(z), 50):               # several IDAT chunks
        out += chunk(b"IDAT", z[i:i + 50])
    out += chunk(b"IEND", b"")
    d = os.path.join(ROOT, "png")
    open(os.path.join(d, name + ".png"), "wb").write(out)
    open(os.path.join(d, name + ".ppm"), "wb").write(ppm(w, h, rgb))
    check_pil(os.path.join(d, name + ".png"), rgb)


def check_pil(path, rgb):
    """when PIL is there (Debian: python3-pil), the expected pixels must be its convert("RGB")"""
    if Image is not None:
        assert Image.open(path).convert("RGB").tobytes() == bytes(rgb), path + ": PIL disagrees"


def gen_png():
    os.makedirs(os.path.join(ROOT, "png"), exist_ok=True)
    rng = random.Random(1234)
    combos = [(0, d) for d in (1, 2, 4, 8, 16)] + [(2, 8), (2, 16)] + [(3, d) for d in (1, 2, 4, 8)] + \
             [(4, 8), (4, 16), (6, 8), (6, 16)]
    for ctype, depth in combos:
        for il in (0, 1):
            make_png("c%d_d%d%s" % (ctype, depth, "_i" if il else ""), 13, 11, ctype, depth, il, rng)
    make_png("tiny_i", 1, 1, 2, 8, 1, rng)       # Adam7 with six empty passes


def picture(w, h):
    """a smooth picture with edges and a little noise (JPEG-like content)"""
    rng = random.Random(99)
    px = bytearray()
    for y in range(h):
        for x in range(w):
            r = 128 + 100 * ((x - w / 2) * (y - h / 3)) / (w * h / 4)
            g = 255 * x / w if (x // 9 + y // 7) % 2 else 40
            b = 200 if (x - 30) ** 2 + (y - 20) ** 2 < 150 else 255 * y / h
            px += bytes(max(0, min(255, int(v + rng.randint(-12, 12)))) for v in (r, g, b))
    return px


def gen_jpeg():
    d = os.path.join(ROOT, "jpeg")
    os.makedirs(d, exist_ok=True)
    src = os.path.join(d, "src.ppm")
    variants = {
        "b420": ["-sample", "2x2"],
        "b444": ["-sample", "1x1"],
        "b422": ["-sample", "2x1"],
        "b440": ["-sample", "1x2"],
        "b411": ["-sample", "4x1"],
        "gray": ["-grayscale"],
        "rgb": ["-rgb"],
        "opt420": ["-sample", "2x2", "-optimize", "-quality", "60"],
        "rst420": ["-sample", "2x2", "-restart", "1"],
        "prog420": ["-sample", "2x2", "-progressive"],
        "prog444": ["-sample", "1x1", "-progressive", "-quality", "98"],
        "proggray": ["-grayscale", "-progressive"],
        "progrst": ["-sample", "2x2", "-progressive", "-restart", "3B"],
    }
    for (w, h, suffix) in ((61, 45, ""), (3, 2, "_tiny")):
        open(src, "wb").write(ppm(w, h, picture(w, h)))
        for name, args in variants.items():
            if suffix and name not in ("b420", "b422", "prog420"):
                continue
            jpg = os.path.join(d, name + suffix + ".jpg")
            subprocess.run(["cjpeg", "-quality", "90"] + args + ["-outfile", jpg, src], check=True)
            out = subprocess.run(["djpeg", "-ppm", jpg], check=True, capture_output=True).stdout
            if out.startswith(b"P5"):            # gray: PIL's convert("RGB") replicates
                head, data = out.split(b"\n255\n", 1)
                ww, hh = map(int, head.split()[1:3])
                out = ppm(ww, hh, [v for v in data for _ in range(3)])
            open(os.path.join(d, name + suffix + ".ppm"), "wb").write(out)
            check_pil(jpg, out.split(b"\n255\n", 1)[1])
    os.remove(src)


def gen_resize():
    """DiffSynth's ImageCropAndResize.crop_and_resize with PIL (torchvision's resize on a PIL
    image is Image.resize; its center_crop offsets are int(round((size - crop) / 2)))"""
    d = os.path.join(ROOT, "resize")
    os.makedirs(d, exist_ok=True)
    w, h = 67, 41
    src = Image.frombytes("RGB", (w, h), bytes(picture(w, h)))
    src.save(os.path.join(d, "src.png"))
    for tw, th in ((32, 32), (48, 16), (16, 16), (80, 64), (67, 20), (20, 41), (7, 5), (131, 83)):
        scale = max(tw / w, th / h)
        img = src.resize((round(w * scale), round(h * scale)), Image.BILINEAR)
        left, top = int(round((img.width - tw) / 2.0)), int(round((img.height - th) / 2.0))
        img = img.crop((left, top, left + tw, top + th))
        open(os.path.join(d, "%dx%d.ppm" % (tw, th)), "wb").write(ppm(tw, th, img.tobytes()))


if __name__ == "__main__":
    gen_png()
    gen_jpeg()
    if Image is not None:
        gen_resize()
    else:
        print("PIL not found: test/data/resize left as it is")
