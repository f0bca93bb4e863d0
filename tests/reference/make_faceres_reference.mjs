// faceres's outputs computed by TensorFlow.js itself, for tests/pretrained/test_faceres.py.
//
// Made with node v20.20.2 and @tensorflow/tfjs 4.22.0 (its pure-JS "cpu" backend), installed
// in a scratch folder outside the repository (TFJS):  cd "$TFJS" && npm install @tensorflow/tfjs@4.22.0
//
// Run from the repository's root; ref/ is a scratch folder (delete it afterwards).
// 1. The inputs: the first photo of 6 CelebA people (celeba128 folders 0, 45, ..., 225 in sorted
//    order), 3 kept at 128x128 and 3 shrunk to 64x64 with PIL's bilinear filter, as uint8:
//      python -c "import numpy as np; from pathlib import Path; from PIL import Image;
//        ps = sorted(p for p in Path('../shared/datasets/celeba128').iterdir() if p.is_dir());
//        im = [Image.open(sorted(ps[i].iterdir())[0]).convert('RGB') for i in range(0, 270, 45)];
//        np.save('ref/images128.npy', np.stack([np.asarray(i) for i in im[:3]]));
//        np.save('ref/images64.npy', np.stack([np.asarray(i.resize((64, 64),
//          Image.BILINEAR)) for i in im[3:]]))"
// 2. NODE_PATH="$TFJS"/node_modules node tests/reference/make_faceres_reference.mjs \
//      ~/.cache/jaxmia/models/faceres ref
//    For each imagesS.npy it writes, as float32 .npy: descriptorS (global_pooling/Mean), ageS
//    (age_pred/Softmax), maleS (gender_pred/Sigmoid) with the image resized to 224 by
//    resizeBilinear with half-pixel centres (the resize jax.image.resize does when enlarging),
//    and humanS, the descriptor with human's own resize (src/face/faceres.ts: no half-pixel
//    centres), to measure how far the two resizes are apart.
// 3. Packed: np.savez_compressed('tests/reference/faceres_reference.npz', **{f.stem: np.load(f)
//      for f in Path('ref').glob('*.npy')})
import { createRequire } from 'module';
import fs from 'fs';
import path from 'path';

const require = createRequire(import.meta.url); // finds tfjs through NODE_PATH
const tf = require('@tensorflow/tfjs');

// .npy: magic, version 1.0, a little-endian u16 header length, a Python-dict header, raw data
function readNpy(file) {
  const buf = fs.readFileSync(file);
  const headerLength = buf.readUInt16LE(8);
  const header = buf.toString('latin1', 10, 10 + headerLength);
  const shape = header.match(/'shape': \(([^)]*)\)/)[1].split(',').filter((s) => s.trim()).map(Number);
  if (!header.includes("'descr': '|u1'")) throw new Error(`${file}: expected uint8`);
  return tf.tensor(new Uint8Array(buf.subarray(10 + headerLength)), shape, 'int32');
}

function writeNpy(file, tensor) {
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${tensor.shape.join(', ')},), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n';
  const prefix = Buffer.alloc(10);
  prefix.write('\x93NUMPY', 0, 'latin1');
  prefix.writeUInt8(1, 6);
  prefix.writeUInt16LE(header.length, 8);
  const values = tensor.dataSync();
  const data = Buffer.from(values.buffer, values.byteOffset, values.byteLength);
  fs.writeFileSync(file, Buffer.concat([prefix, Buffer.from(header, 'latin1'), data]));
}

const [modelDir, refDir] = process.argv.slice(2);
await tf.setBackend('cpu');
const spec = JSON.parse(fs.readFileSync(path.join(modelDir, 'faceres.json')));
const bin = fs.readFileSync(path.join(modelDir, 'faceres.bin'));
const model = await tf.loadGraphModel(tf.io.fromMemory({
  modelTopology: spec.modelTopology,
  weightSpecs: spec.weightsManifest[0].weights,
  weightData: bin.buffer.slice(bin.byteOffset, bin.byteOffset + bin.byteLength),
  format: spec.format,
  signature: spec.signature,
}));
const outputs = ['global_pooling/Mean', 'age_pred/Softmax', 'gender_pred/Sigmoid'];
for (const size of [128, 64]) {
  const x = tf.div(tf.cast(readNpy(path.join(refDir, `images${size}.npy`)), 'float32'), 255);
  const halfPixel = tf.mul(tf.image.resizeBilinear(x, [224, 224], false, true), 255);
  const [descriptor, age, male] = model.execute(halfPixel, outputs);
  writeNpy(path.join(refDir, `descriptor${size}.npy`), descriptor);
  writeNpy(path.join(refDir, `age${size}.npy`), age);
  writeNpy(path.join(refDir, `male${size}.npy`), tf.reshape(male, [-1]));
  const human = tf.mul(tf.image.resizeBilinear(x, [224, 224], false), 255);
  writeNpy(path.join(refDir, `human${size}.npy`), model.execute(human, outputs[0]));
  console.log(size, descriptor.shape, age.shape, male.shape, tf.getBackend());
}
