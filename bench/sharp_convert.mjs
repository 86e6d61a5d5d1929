// sharp_convert.mjs SRC DEST N QUALITY EFFORT
//
// A peer for bench/compare.py: converts every image under SRC to WebP with
// sharp, N files in flight, each as
//   sharp(in).rotate().webp({ quality: Q, effort: EFFORT }).toFile(out)
// Outputs mirror SRC's tree in DEST (a/b.jpg -> DEST/a/b.webp). Prints one
// JSON line: files converted and failed, seconds, sharp.concurrency().
//
// sharp's own concurrency (libvips threads per image) is left at its default.
// On this machine (glibc Linux, 2 cores) sharp.concurrency() reports 1: sharp
// defaults to 1 thread on glibc-based Linux without jemalloc, to limit memory
// fragmentation (elsewhere it is the number of cores). libuv's thread pool
// (UV_THREADPOOL_SIZE, default 4) runs the N images in flight.
//
// `node sharp_convert.mjs --version` prints the versions as JSON instead.
//
// sharp is looked up in bench/.peers/node_modules (where `make bench` installs
// it), then wherever node would find it from here.

import { mkdir, readdir } from "node:fs/promises";
import { createRequire } from "node:module";
import path from "node:path";

const HELP = `usage: node sharp_convert.mjs SRC DEST N QUALITY EFFORT
       node sharp_convert.mjs --version

Converts every image under SRC to WebP in DEST with sharp, N files in flight:
sharp(in).rotate().webp({quality: QUALITY, effort: EFFORT}).toFile(out).
sharp's own concurrency is left at its default (see sharp.concurrency() in --version).
Prints one JSON line: converted, failed, seconds, concurrency.`;

const SUFFIXES = new Set([".jpg", ".jpeg", ".png", ".webp", ".gif", ".tif", ".tiff", ".avif"]);

function loadSharp() {
  const places = [new URL("./.peers/package.json", import.meta.url), import.meta.url];
  for (const place of places) {
    try {
      return createRequire(place)("sharp");
    } catch {
      // not there; try the next place
    }
  }
  return null;
}

async function listImages(root) {
  const found = [];
  for (const entry of await readdir(root, { withFileTypes: true, recursive: true })) {
    const full = path.join(entry.parentPath ?? entry.path, entry.name);
    if (entry.isFile() && SUFFIXES.has(path.extname(entry.name).toLowerCase())) {
      found.push(full);
    }
  }
  return found.sort();
}

async function convertAll(sharp, src, dest, inFlight, quality, effort) {
  const files = await listImages(src);
  let next = 0;
  let converted = 0;
  let failed = 0;
  // N loops pulling from one queue: exactly N files in flight until the queue ends.
  async function lane() {
    while (next < files.length) {
      const input = files[next++];
      const relative = path.relative(src, input);
      const output = path.join(dest, relative.slice(0, -path.extname(relative).length) + ".webp");
      try {
        await mkdir(path.dirname(output), { recursive: true });
        await sharp(input).rotate().webp({ quality, effort }).toFile(output);
        converted++;
      } catch (error) {
        failed++;
        console.error(`failed: ${input}: ${error.message}`);
      }
    }
  }
  await Promise.all(Array.from({ length: inFlight }, lane));
  return { converted, failed };
}

async function main(argv) {
  const sharp = loadSharp();
  if (sharp === null) {
    console.error("sharp_convert: sharp is not installed (npm install --prefix bench/.peers sharp)");
    return 3;
  }
  if (argv[0] === "--version") {
    const versions = {
      sharp: sharp.versions.sharp,
      libvips: sharp.versions.vips,
      libwebp: sharp.versions.webp ?? "?",
      node: process.versions.node,
      concurrency: sharp.concurrency(),
    };
    console.log(JSON.stringify(versions));
    return 0;
  }
  if (argv[0] === "--help" || argv[0] === "-h") {
    console.log(HELP);
    return 0;
  }
  if (argv.length !== 5) {
    console.error(HELP);
    return 2;
  }
  const [src, dest] = argv;
  const [inFlight, quality, effort] = argv.slice(2).map(Number);
  const started = process.hrtime.bigint();
  const { converted, failed } = await convertAll(sharp, src, dest, inFlight, quality, effort);
  const seconds = Number(process.hrtime.bigint() - started) / 1e9;
  console.log(JSON.stringify({ converted, failed, seconds, concurrency: sharp.concurrency() }));
  return failed ? 1 : 0;
}

process.exitCode = await main(process.argv.slice(2));
