//! Hostile model files: a small Llama-shaped GGUF built here (byte vocabulary, Q8_0 and Q4_0
//! weights, a chat template) is mutated thousands of times, deterministically: truncated at
//! every header byte and throughout the data, header fields (counts, string and array
//! lengths, value types, dimensions, tensor types, offsets) set to hostile values, offsets
//! made to overlap, and random bytes flipped. Each mutant is loaded the way the server loads a
//! model (`loader::load`). None may panic; each load either succeeds or returns an error that
//! names the model; and the bytes allocated during a load never exceed the file's size plus
//! [`ALLOCATION_BOUND`], counted by this binary's global allocator.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "an integration test crate: its helpers, outside `#[test]` fns, are not covered by clippy.toml's allow-*-in-tests"
)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::quantized::GgmlDType;
use tollgate_runtime::loader::{load, LoadOptions, ModelSource};
use tollgate_runtime::model::WeightForm;
use tollgate_runtime::synth::{byte_vocab, gguf_bytes, LlamaShape, SynthTensor};

/// Allocation allowed during a load beyond the file's own size: the parsed metadata's
/// allowance (64 MiB) and the loader's fixed costs.
const ALLOCATION_BOUND: usize = 80 << 20;

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            if new_size >= layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// The counters are global: the tests of this binary run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes the lock, and turns off backtrace capture before any error is made: candle captures
/// one in each error when `RUST_BACKTRACE` is set, and the first capture loads the binary's
/// debug information (≈ 85 MB, once per process, whatever the file), which is not what
/// this measures.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    let guard = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    std::env::remove_var("RUST_BACKTRACE");
    std::env::remove_var("RUST_LIB_BACKTRACE");
    guard
}

const TEMPLATE: &str = "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}";

/// The model every mutant starts from: Q8_0 projections, Q4_0 output, f32 norms.
fn base_file() -> Vec<u8> {
    let specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
    ];
    let shape = LlamaShape {
        vocab: 256 + specials.len() + 3,
        hidden: 64,
        layers: 2,
        heads: 4,
        kv_heads: 1,
        ffn: 96,
        context: 131_072,
        rope_theta: 500_000.0,
        tied: false,
    };
    let mut metadata = shape.metadata();
    metadata.extend(byte_vocab(&specials, 0, 4, TEMPLATE));
    // Pad the vocabulary to the embedding's rows.
    if let Some((_, candle_core::quantized::gguf_file::Value::Array(tokens))) = metadata
        .iter_mut()
        .find(|(k, _)| k == "tokenizer.ggml.tokens")
    {
        for i in 0..3 {
            tokens.push(candle_core::quantized::gguf_file::Value::String(format!(
                "<pad{i}>"
            )));
        }
    }
    if let Some((_, candle_core::quantized::gguf_file::Value::Array(types))) = metadata
        .iter_mut()
        .find(|(k, _)| k == "tokenizer.ggml.token_type")
    {
        types.extend((0..3).map(|_| candle_core::quantized::gguf_file::Value::I32(5)));
    }
    let tensors: Vec<SynthTensor> = shape
        .tensors(GgmlDType::Q8_0)
        .into_iter()
        .map(|mut t| {
            if t.name == "output.weight" {
                t.dtype = GgmlDType::Q4_0;
            }
            t
        })
        .collect();
    gguf_bytes(&metadata, &tensors).unwrap()
}

/// A header field worth mutating: where it is and how wide.
#[derive(Debug, Clone, Copy)]
struct Field {
    at: usize,
    width: usize,
    kind: Kind,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Count,
    Length,
    ValueType,
    Dims,
    Dim,
    TensorType,
    Offset,
}

/// The fields of a GGUF v3 header, found by walking it.
fn fields(b: &[u8]) -> Vec<Field> {
    let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
    let mut out = vec![
        Field {
            at: 8,
            width: 8,
            kind: Kind::Count,
        },
        Field {
            at: 16,
            width: 8,
            kind: Kind::Count,
        },
    ];
    let (tensors, entries) = (u64_at(8), u64_at(16));
    let mut at = 24;
    fn value(b: &[u8], ty: u32, at: &mut usize, out: &mut Vec<Field>) {
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap()) as usize;
        match ty {
            0 | 1 | 7 => *at += 1,
            2 | 3 => *at += 2,
            4..=6 => *at += 4,
            10..=12 => *at += 8,
            8 => {
                out.push(Field {
                    at: *at,
                    width: 8,
                    kind: Kind::Length,
                });
                *at += 8 + u64_at(*at);
            }
            9 => {
                out.push(Field {
                    at: *at,
                    width: 4,
                    kind: Kind::ValueType,
                });
                let elem = u32_at(*at);
                out.push(Field {
                    at: *at + 4,
                    width: 8,
                    kind: Kind::Length,
                });
                let len = u64_at(*at + 4);
                *at += 12;
                // Record the fields of the first few elements only.
                let mut sink = Vec::new();
                for i in 0..len {
                    value(b, elem, at, if i < 4 { &mut *out } else { &mut sink });
                }
            }
            _ => unreachable!("the base file is well formed"),
        }
    }
    // A metadata entry and a tensor info both open with a name (its length, then its bytes)
    // and a u32 field of `kind` (the value's type, the tensor's dimension count).
    let name_then_u32 = |at: &mut usize, out: &mut Vec<Field>, kind: Kind| {
        out.push(Field {
            at: *at,
            width: 8,
            kind: Kind::Length,
        });
        *at += 8 + u64_at(*at);
        out.push(Field {
            at: *at,
            width: 4,
            kind,
        });
        let v = u32_at(*at);
        *at += 4;
        v
    };
    for _ in 0..entries {
        let ty = name_then_u32(&mut at, &mut out, Kind::ValueType);
        value(b, ty, &mut at, &mut out);
    }
    for _ in 0..tensors {
        let dims = name_then_u32(&mut at, &mut out, Kind::Dims) as usize;
        for _ in 0..dims {
            out.push(Field {
                at,
                width: 8,
                kind: Kind::Dim,
            });
            at += 8;
        }
        out.push(Field {
            at,
            width: 4,
            kind: Kind::TensorType,
        });
        out.push(Field {
            at: at + 4,
            width: 8,
            kind: Kind::Offset,
        });
        at += 12;
    }
    out
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Values a hostile file would put in a field.
fn hostile_value(rng: &mut Rng, field: Field, original: u64, offsets: &[u64]) -> u64 {
    let width_max = if field.width == 4 {
        u64::from(u32::MAX)
    } else {
        u64::MAX
    };
    let choices = [
        0,
        1,
        original.wrapping_add(1),
        original.wrapping_sub(1),
        original.wrapping_mul(2),
        width_max,
        width_max / 2 + 1,
        1 << 31,
        1 << 40,
        match field.kind {
            Kind::Offset => offsets[rng.below(offsets.len())],
            Kind::ValueType | Kind::TensorType => rng.below(40) as u64,
            Kind::Dims => rng.below(8) as u64,
            _ => rng.next(),
        },
    ];
    choices[rng.below(choices.len())] & width_max
}

fn put(file: &mut [u8], field: Field, v: u64) {
    file[field.at..field.at + field.width].copy_from_slice(&v.to_le_bytes()[..field.width]);
}

fn get(file: &[u8], field: Field) -> u64 {
    let mut b = [0u8; 8];
    b[..field.width].copy_from_slice(&file[field.at..field.at + field.width]);
    u64::from_le_bytes(b)
}

/// Loads `bytes` as the server would; `Err` is the error's text. Panics are caught and
/// reported as a failure of the test with the mutation that caused them.
fn load_bytes(path: &Path, bytes: &[u8], what: &str) -> Result<(), String> {
    std::fs::write(path, bytes).unwrap();
    let options = LoadOptions::cpu(WeightForm::Auto);
    let base = LIVE.load(Ordering::Relaxed);
    PEAK.store(base, Ordering::Relaxed);
    let result = catch_unwind(AssertUnwindSafe(|| {
        load("hostile", &ModelSource::Path(path.to_path_buf()), &options)
            .map(drop)
            .map_err(|e| e.to_string())
    }));
    let grew = PEAK.load(Ordering::Relaxed).saturating_sub(base);
    let result = result.unwrap_or_else(|_| panic!("loading panicked: {what}"));
    assert!(
        grew <= bytes.len() + ALLOCATION_BOUND,
        "{what}: {grew} bytes allocated for a file of {}",
        bytes.len()
    );
    if let Err(e) = &result {
        assert!(e.contains("model `hostile`"), "{what}: {e}");
    }
    result
}

#[test]
fn mutated_model_files_fail_cleanly_within_bounded_memory() {
    let _serial = serial();
    let base = base_file();
    let dir = std::env::temp_dir().join(format!("tollgate-hostile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    load_bytes(&path, &base, "the unmutated file").expect("the base file loads");
    let fields = fields(&base);
    let header_end = fields.last().map_or(0, |f| f.at + f.width);
    let offsets: Vec<u64> = fields
        .iter()
        .filter(|f| f.kind == Kind::Offset)
        .map(|f| get(&base, *f))
        .collect();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut loaded, mut refused) = (0, 0);
    let mut tally = |r: Result<(), String>| match r {
        Ok(()) => loaded += 1,
        Err(_) => refused += 1,
    };

    // Truncated: at every byte of the header's first 512, then throughout.
    let cuts = (0..512.min(base.len())).chain((512..base.len()).step_by(997));
    for cut in cuts {
        let r = load_bytes(&path, &base[..cut], &format!("truncated to {cut} bytes"));
        assert!(r.is_err(), "a file truncated to {cut} bytes loaded");
        tally(r);
    }

    // Header fields set to hostile values, one or two at a time.
    for i in 0..1500 {
        let mut file = base.clone();
        let mut what = format!("mutant {i}:");
        for _ in 0..1 + rng.below(2) {
            let field = fields[rng.below(fields.len())];
            let v = hostile_value(&mut rng, field, get(&file, field), &offsets);
            put(&mut file, field, v);
            what.push_str(&format!(" {:?} at {} = {v}", field.kind, field.at));
        }
        tally(load_bytes(&path, &file, &what));
    }

    // Two tensors at the same offset: refused as overlapping.
    let offset_fields: Vec<Field> = fields
        .iter()
        .copied()
        .filter(|f| f.kind == Kind::Offset)
        .collect();
    let mut file = base.clone();
    put(&mut file, offset_fields[3], offsets[2]);
    let err = load_bytes(&path, &file, "overlapping offsets").unwrap_err();
    assert!(err.contains("overlap"), "{err}");
    tally(Err(err));

    // Random bytes flipped, mostly in the header.
    for i in 0..500 {
        let mut file = base.clone();
        let n = 1 + rng.below(4);
        for _ in 0..n {
            let at = if rng.below(4) == 0 {
                rng.below(file.len())
            } else {
                rng.below(header_end)
            };
            file[at] ^= 1 << rng.below(8);
        }
        tally(load_bytes(&path, &file, &format!("flip {i}")));
    }
    std::fs::remove_dir_all(&dir).ok();
    println!("mutants: {loaded} loaded, {refused} refused with an error");
    assert!(refused > 1000, "{refused} refused");
}

/// Specific hostile values get an error that says what is wrong.
#[test]
fn hostile_headers_are_named_in_the_error() {
    let _serial = serial();
    let base = base_file();
    let fields = fields(&base);
    let dir = std::env::temp_dir().join(format!("tollgate-hostile-named-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    let first = |kind: Kind| *fields.iter().find(|f| f.kind == kind).unwrap();
    let cases: Vec<(Field, u64, &str)> = vec![
        (first(Kind::Count), u64::MAX, "tensors"),
        (fields[1], 1 << 40, "metadata entries"),
        (first(Kind::Length), u64::MAX / 2, "needs"),
        (first(Kind::Dim), 1 << 62, "too many elements"),
        (first(Kind::Offset), 1 << 40, "the file has"),
        (first(Kind::Offset), 3, "not aligned"),
    ];
    for (field, value, words) in cases {
        let mut file = base.clone();
        put(&mut file, field, value);
        let what = format!("{:?} at {} = {value}", field.kind, field.at);
        let err = load_bytes(&path, &file, &what).unwrap_err();
        assert!(err.contains(words), "{what}: {err}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Loading keeps one copy of the weights: a 30 MB Llama-shaped file with a tied Q8_0
/// embedding allocates at most 1.15× its size (plus the tokenizer's and loader's few MB) in
/// `native` and `auto`. An f32 embedding table, or the file's bytes kept next to the
/// converted weights, would take 1.6× or more. (`examples/large_model.rs` measures the same
/// for a 1.3 GB file, with the process's RSS.)
#[test]
fn a_model_loads_within_its_file_size() {
    let _serial = serial();
    let shape = LlamaShape {
        vocab: 32_768,
        hidden: 512,
        layers: 4,
        heads: 8,
        kv_heads: 2,
        ffn: 1536,
        context: 131_072,
        rope_theta: 500_000.0,
        tied: true,
    };
    let mut metadata = shape.metadata();
    metadata.extend(byte_vocab(&["<s>", "</s>"], 0, 1, TEMPLATE));
    let bytes = gguf_bytes(&metadata, &shape.tensors(GgmlDType::Q8_0)).unwrap();
    let dir = std::env::temp_dir().join(format!("tollgate-size-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("model.gguf");
    std::fs::write(&path, &bytes).unwrap();
    for weights in [WeightForm::Native, WeightForm::Auto] {
        let options = LoadOptions::cpu(weights);
        let base = LIVE.load(Ordering::Relaxed);
        PEAK.store(base, Ordering::Relaxed);
        let loaded = load("size", &ModelSource::Path(path.clone()), &options).unwrap();
        let peak = PEAK.load(Ordering::Relaxed) - base;
        let kept = LIVE.load(Ordering::Relaxed) - base;
        drop(loaded);
        let ratio = peak as f64 / bytes.len() as f64;
        println!(
            "{weights}: file {} bytes, peak {peak} ({ratio:.3}x), kept {kept}",
            bytes.len()
        );
        assert!(
            peak as f64 <= 1.15 * bytes.len() as f64 + (4 << 20) as f64,
            "{weights}: {peak} bytes allocated loading a file of {}",
            bytes.len()
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
