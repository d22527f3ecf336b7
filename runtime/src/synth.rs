//! Llama-shaped GGUF files with random weights, written at test or bench time: no real weights
//! can be downloaded where Tollgate is tested, and a 1B-parameter file is too big to keep.
//!
//! The writer streams: metadata and tensor infos first, then each tensor's bytes generated
//! block by block, so a file larger than memory can be written. Weights are deterministic
//! (xorshift from a seed per tensor). It owns writing only; reading goes through
//! [`crate::gguf`].

use std::io::Write;

pub use candle_core::quantized::gguf_file::Value;
pub use candle_core::quantized::GgmlDType;
use half::f16;

use crate::{Error, Result};

/// Alignment of tensor data (GGUF's default).
const ALIGN: u64 = 32;

/// How a tensor's values are drawn: `offset + scale * u` with `u` uniform in `[-1, 1)`.
#[derive(Debug, Clone, Copy)]
pub struct Fill {
    pub seed: u32,
    pub scale: f32,
    pub offset: f32,
}

/// One tensor to write: candle's dimension order (`(rows, cols)`, outermost first).
#[derive(Debug, Clone)]
pub struct SynthTensor {
    pub name: String,
    pub dtype: GgmlDType,
    pub dims: Vec<usize>,
    pub fill: Fill,
}

impl SynthTensor {
    /// Bytes of the tensor's data.
    pub fn size_in_bytes(&self) -> usize {
        let elems: usize = self.dims.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// The shape of a Llama-architecture model.
#[derive(Debug, Clone)]
pub struct LlamaShape {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub ffn: usize,
    pub context: usize,
    pub rope_theta: f32,
    /// No `output.weight`: the embedding is the output projection (Llama 3.2 1B/3B).
    pub tied: bool,
}

impl LlamaShape {
    /// Llama 3.2 1B: 1.24B parameters, 128k context, tied embeddings.
    pub fn llama32_1b() -> Self {
        Self {
            vocab: 128_256,
            hidden: 2048,
            layers: 16,
            heads: 32,
            kv_heads: 8,
            ffn: 8192,
            context: 131_072,
            rope_theta: 500_000.0,
            tied: true,
        }
    }

    /// Parameters of the weights (norms included).
    pub fn parameters(&self) -> usize {
        let head_dim = self.hidden / self.heads;
        let kv = self.kv_heads * head_dim;
        let block = self.hidden * (2 * self.hidden + 2 * kv) + 3 * self.hidden * self.ffn;
        let head = if self.tied {
            0
        } else {
            self.vocab * self.hidden
        };
        self.vocab * self.hidden + head + self.layers * (block + 2 * self.hidden) + self.hidden
    }

    /// `llama.*` metadata of this shape.
    pub fn metadata(&self) -> Vec<(String, Value)> {
        let u = |n: usize| Value::U32(n as u32);
        vec![
            ("general.architecture".into(), Value::String("llama".into())),
            (
                "general.name".into(),
                Value::String("synthetic llama".into()),
            ),
            ("llama.block_count".into(), u(self.layers)),
            ("llama.context_length".into(), u(self.context)),
            ("llama.embedding_length".into(), u(self.hidden)),
            ("llama.feed_forward_length".into(), u(self.ffn)),
            ("llama.attention.head_count".into(), u(self.heads)),
            ("llama.attention.head_count_kv".into(), u(self.kv_heads)),
            ("llama.rope.freq_base".into(), Value::F32(self.rope_theta)),
            (
                "llama.rope.dimension_count".into(),
                u(self.hidden / self.heads),
            ),
            (
                "llama.attention.layer_norm_rms_epsilon".into(),
                Value::F32(1e-5),
            ),
            ("llama.vocab_size".into(), u(self.vocab)),
        ]
    }

    /// The tensors of this shape, projections in `weights`, norms in f32.
    pub fn tensors(&self, weights: GgmlDType) -> Vec<SynthTensor> {
        let head_dim = self.hidden / self.heads;
        let kv = self.kv_heads * head_dim;
        let mut seed = 0;
        let mut t = |name: String, dtype: GgmlDType, dims: Vec<usize>, scale: f32, offset: f32| {
            seed += 1;
            SynthTensor {
                name,
                dtype,
                dims,
                fill: Fill {
                    seed,
                    scale,
                    offset,
                },
            }
        };
        let (h, f) = (self.hidden, self.ffn);
        let mut out = vec![
            t(
                "token_embd.weight".into(),
                weights,
                vec![self.vocab, h],
                1.0,
                0.0,
            ),
            t(
                "output_norm.weight".into(),
                GgmlDType::F32,
                vec![h],
                0.2,
                1.0,
            ),
        ];
        if !self.tied {
            out.push(t(
                "output.weight".into(),
                weights,
                vec![self.vocab, h],
                0.5,
                0.0,
            ));
        }
        for i in 0..self.layers {
            let mut add = |name: &str, dtype, dims, scale, offset| {
                out.push(t(
                    format!("blk.{i}.{name}.weight"),
                    dtype,
                    dims,
                    scale,
                    offset,
                ));
            };
            add("attn_norm", GgmlDType::F32, vec![h], 0.2, 1.0);
            add("ffn_norm", GgmlDType::F32, vec![h], 0.2, 1.0);
            add("attn_q", weights, vec![h, h], 0.3, 0.0);
            add("attn_k", weights, vec![kv, h], 0.3, 0.0);
            add("attn_v", weights, vec![kv, h], 0.2, 0.0);
            add("attn_output", weights, vec![h, h], 0.2, 0.0);
            add("ffn_gate", weights, vec![f, h], 0.2, 0.0);
            add("ffn_up", weights, vec![f, h], 0.2, 0.0);
            add("ffn_down", weights, vec![h, f], 0.15, 0.0);
        }
        out
    }
}

/// `tokenizer.*` metadata of a small byte-level vocabulary: the 256 byte tokens (GPT-2's
/// alphabet), no merges, then `specials` as control tokens (ids 256, 257, ...). `bos` and
/// `eos` index into `specials`; `template` is the chat template.
pub fn byte_vocab(
    specials: &[&str],
    bos: usize,
    eos: usize,
    template: &str,
) -> Vec<(String, Value)> {
    let mut tokens: Vec<Value> = byte_alphabet()
        .into_iter()
        .map(|c| Value::String(c.to_string()))
        .collect();
    let mut types = vec![Value::I32(1); tokens.len()];
    for s in specials {
        tokens.push(Value::String((*s).to_string()));
        types.push(Value::I32(3));
    }
    vec![
        ("tokenizer.ggml.model".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), Value::String("gpt2".into())),
        ("tokenizer.ggml.tokens".into(), Value::Array(tokens)),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        ("tokenizer.ggml.merges".into(), Value::Array(Vec::new())),
        (
            "tokenizer.ggml.bos_token_id".into(),
            Value::U32(256 + bos as u32),
        ),
        (
            "tokenizer.ggml.eos_token_id".into(),
            Value::U32(256 + eos as u32),
        ),
        (
            "tokenizer.chat_template".into(),
            Value::String(template.into()),
        ),
    ]
}

/// GPT-2's byte-level alphabet: the char standing for each byte.
fn byte_alphabet() -> Vec<char> {
    let printable = |b: u32| {
        (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || (0xae..=0xff).contains(&b)
    };
    let mut extra = 0;
    (0u32..256)
        .map(|b| {
            let c = if printable(b) {
                b
            } else {
                extra += 1;
                255 + extra
            };
            char::from_u32(c).unwrap_or('?')
        })
        .collect()
}

/// GGUF type id of the types this writer generates.
fn type_id(dtype: GgmlDType) -> Result<u32> {
    Ok(match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q8_0 => 8,
        other => {
            return Err(Error::Weights(format!(
                "the synthetic writer does not generate {other:?}"
            )))
        }
    })
}

fn put_str(w: &mut impl Write, s: &str) -> std::io::Result<()> {
    w.write_all(&(s.len() as u64).to_le_bytes())?;
    w.write_all(s.as_bytes())
}

fn value_type(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut impl Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => put_str(w, s),
        Value::Array(items) => {
            // `Value` keeps no element type for an empty array: string, the type of the
            // arrays this writer leaves empty (merges).
            let ty = items.first().map_or(8, value_type);
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| put_value(w, i))
        }
    }
}

/// `n` values in `[-1, 1)`, the same for the same seed: the draw [`Fill`] scales, as test data
/// for kernels and models built in memory.
pub fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.unit()).collect()
}

/// xorshift32 in `[-1, 1)`.
struct Rng(u32);

impl Rng {
    fn new(seed: u32) -> Self {
        Self(seed.wrapping_mul(2_654_435_761).max(1))
    }

    fn next_u32(&mut self) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        self.0
    }

    fn unit(&mut self) -> f32 {
        (self.next_u32() as f32 / u32::MAX as f32) * 2.0 - 1.0
    }
}

/// Writes one tensor's data, generated a block at a time.
fn put_data(w: &mut impl Write, t: &SynthTensor) -> Result<()> {
    let elems: usize = t.dims.iter().product();
    let mut rng = Rng::new(t.fill.seed);
    let Fill { scale, offset, .. } = t.fill;
    let mut buf: Vec<u8> = Vec::with_capacity(1 << 16);
    let blocks = elems / t.dtype.block_size();
    for _ in 0..blocks {
        match t.dtype {
            GgmlDType::F32 => buf.extend((offset + scale * rng.unit()).to_le_bytes()),
            GgmlDType::F16 => {
                buf.extend(f16::from_f32(offset + scale * rng.unit()).to_le_bytes());
            }
            GgmlDType::Q8_0 => {
                buf.extend(f16::from_f32(scale / 127.0).to_le_bytes());
                buf.extend((0..32).map(|_| (rng.next_u32() % 255) as u8 ^ 0x80));
            }
            GgmlDType::Q4_0 => {
                buf.extend(f16::from_f32(scale / 8.0).to_le_bytes());
                buf.extend((0..16).map(|_| rng.next_u32() as u8));
            }
            GgmlDType::Q4_1 => {
                buf.extend(f16::from_f32(scale / 8.0).to_le_bytes());
                buf.extend(f16::from_f32(offset - scale).to_le_bytes());
                buf.extend((0..16).map(|_| rng.next_u32() as u8));
            }
            other => {
                return Err(Error::Weights(format!(
                    "the synthetic writer does not generate {other:?}"
                )))
            }
        }
        if buf.len() >= 1 << 16 {
            w.write_all(&buf).map_err(io_err)?;
            buf.clear();
        }
    }
    w.write_all(&buf).map_err(io_err)
}

fn io_err(e: std::io::Error) -> Error {
    Error::Weights(format!("writing a synthetic GGUF: {e}"))
}

/// Writes a GGUF (version 3) file: `metadata`, then `tensors` with generated data. Returns the
/// bytes written.
pub fn write_gguf(
    w: &mut impl Write,
    metadata: &[(String, Value)],
    tensors: &[SynthTensor],
) -> Result<u64> {
    let mut head: Vec<u8> = Vec::new();
    head.extend(0x4655_4747u32.to_le_bytes());
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        put_str(&mut head, key).map_err(io_err)?;
        head.extend(value_type(value).to_le_bytes());
        put_value(&mut head, value).map_err(io_err)?;
    }
    let mut offset = 0u64;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut head, &t.name).map_err(io_err)?;
        head.extend((t.dims.len() as u32).to_le_bytes());
        for d in t.dims.iter().rev() {
            head.extend((*d as u64).to_le_bytes());
        }
        head.extend(type_id(t.dtype)?.to_le_bytes());
        head.extend(offset.to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.size_in_bytes() as u64).div_ceil(ALIGN) * ALIGN;
    }
    let pad = |len: u64| vec![0u8; (len.div_ceil(ALIGN) * ALIGN - len) as usize];
    head.extend(pad(head.len() as u64));
    w.write_all(&head).map_err(io_err)?;
    let mut written = head.len() as u64;
    for t in tensors {
        put_data(w, t)?;
        let size = t.size_in_bytes() as u64;
        w.write_all(&pad(size)).map_err(io_err)?;
        written += size.div_ceil(ALIGN) * ALIGN;
    }
    Ok(written)
}

/// [`write_gguf`] into memory.
pub fn gguf_bytes(metadata: &[(String, Value)], tensors: &[SynthTensor]) -> Result<Vec<u8>> {
    let mut buf = Vec::new();
    write_gguf(&mut buf, metadata, tensors)?;
    Ok(buf)
}
