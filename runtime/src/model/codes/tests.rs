//! Block codes against candle's dequantization and every kernel path against the portable one.

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use super::super::pseudo_random;
use super::*;
use crate::Result;

/// `y = x·wᵀ` in f64.
fn exact(w: &[f32], x: &[f32], out: usize, inp: usize) -> Vec<f32> {
    let rows = x.len() / inp;
    let mut y = vec![0f32; rows * out];
    for r in 0..rows {
        for j in 0..out {
            y[r * out + j] = (0..inp)
                .map(|k| f64::from(w[j * inp + k]) * f64::from(x[r * inp + k]))
                .sum::<f64>() as f32;
        }
    }
    y
}

/// The fast kernel gives bit for bit the portable loop's result, for row counts with full
/// and partial tiles and a partial last panel; a row's result does not depend on the other
/// rows of the call; and its rms error against the f32 product is under `tolerance`.
fn check(m: &CodeMatrix, w: &[f32], tolerance: f32) {
    for kernels in CpuKernels::available() {
        println!("block-code kernels: {kernels}");
        check_on(kernels, m, w, tolerance);
    }
}

fn check_on(kernels: CpuKernels, m: &CodeMatrix, w: &[f32], tolerance: f32) {
    let (out, inp) = (m.out, m.inp);
    // Up to 17 rows: every tile width of every path, full tiles and a partial last one.
    let most = 17;
    let xs = pseudo_random(most * inp, 7);
    let alone: Vec<Vec<f32>> = (0..most)
        .map(|r| matmul_many_on(kernels, &[m], &xs[r * inp..(r + 1) * inp], 1).remove(0))
        .collect();
    for rows in [1, 3, 4, 5, 6, 7, 8, 9, most] {
        let x = &xs[..rows * inp];
        let y = matmul_many_on(kernels, &[m], x, rows).remove(0);
        let xq = quantize_rows(x);
        for p in 0..m.panels() {
            let mut reference = vec![0f32; rows * PANEL];
            m.panel_rows(CpuKernels::Scalar, p, &xq, rows, &mut reference);
            let width = PANEL.min(out - p * PANEL);
            for r in 0..rows {
                assert_eq!(
                    &y[r * out + p * PANEL..][..width],
                    &reference[r * PANEL..][..width],
                    "{kernels}: rows {rows} row {r} panel {p}"
                );
            }
        }
        for (r, alone) in alone.iter().enumerate().take(rows) {
            assert_eq!(&y[r * out..(r + 1) * out], &alone[..], "row {r} of {rows}");
        }
        let want = exact(w, x, out, inp);
        let rms = (y
            .iter()
            .zip(&want)
            .map(|(g, w)| (g - w).powi(2))
            .sum::<f32>()
            / y.len() as f32)
            .sqrt();
        assert!(rms < tolerance, "rms error {rms}");
    }
}

#[test]
fn seven_bit_codes_match_the_portable_loop_and_f32() {
    assert_eq!(
        CodeMatrix::is_fast_for(96),
        CpuKernels::selected().has_avx2()
    );
    let (out, inp) = (130, 96);
    let w = pseudo_random(out * inp, 1);
    let m = CodeMatrix::quantize(&w, out, inp);
    assert!(!m.small);
    // 7-bit weights and 8-bit activations (measured 0.028; products' rms ≈ 3.3).
    check(&m, &w, 0.04);
}

/// Q4_0 and Q4_1 tensors keep their codes: the product equals the product with candle's
/// own dequantization of the same tensor, up to the activations' quantization.
#[test]
fn q4_codes_are_read_exactly() -> Result<()> {
    // More rows than one read takes (8 panels), and a partial last panel.
    let (out, inp) = (140, 128);
    let w = pseudo_random(out * inp, 3);
    let t = Tensor::from_slice(&w, (out, inp), &Device::Cpu)?;
    for dtype in [GgmlDType::Q4_0, GgmlDType::Q4_1] {
        let q = QTensor::quantize(&t, dtype)?;
        let m = CodeMatrix::from_q4(&q)?.expect("a Q4 tensor");
        assert!(m.small);
        let deq = super::super::dequantized(&q);
        // Reconstruct each weight from the packed codes and compare with candle.
        let nb = inp / BLOCK;
        for j in 0..out {
            for b in 0..nb {
                let (codes, d, offset) = m.block(j, b);
                for (k, &code) in codes.iter().enumerate() {
                    let got = f32::from(code) * d + offset;
                    let want = deq[j * inp + b * BLOCK + k];
                    assert!(
                        (got - want).abs() < 1e-6,
                        "{dtype:?} w[{j}][{}] {got} vs {want}",
                        b * BLOCK + k
                    );
                }
            }
        }
        // Read a few rows at a time (as the loader does from the file), the same matrix.
        let data = q.data()?;
        let row_bytes = data.len() / out;
        let read = CodeMatrix::from_q4_reader(dtype, out, inp, |first, buf| {
            buf.copy_from_slice(&data[first * row_bytes..][..buf.len()]);
            Ok(())
        })?
        .expect("a Q4 tensor");
        assert_eq!((&read.codes, &read.dm16), (&m.codes, &m.dm16));
        // Half a byte per weight and f16 scales (and Q4_1's offsets), as the file stores
        // them.
        let padded = out.div_ceil(PANEL) * PANEL;
        assert_eq!(m.codes.len(), padded * inp / 2);
        let halves = if dtype == GgmlDType::Q4_1 { 2 } else { 1 };
        assert_eq!(m.dm16.len(), padded * (inp / BLOCK) * halves);
        // Only the activations are quantized (measured 0.014).
        check(&m, &deq, 0.02);
        // A tied embedding's rows are exactly GGML's dequantization.
        let mut row = vec![0f32; inp];
        for j in [0, 17, out - 1] {
            m.row_into(j, &mut row);
            assert_eq!(row, deq[j * inp..(j + 1) * inp], "{dtype:?} row {j}");
        }
    }
    let q8 = QTensor::quantize(&t, GgmlDType::Q8_0)?;
    assert!(CodeMatrix::from_q4(&q8)?.is_none());
    Ok(())
}
