//! Bar charts as inline SVG: no script, no library, nothing fetched. Labels are escaped here,
//! so the result can be embedded as is.

use std::fmt::Write;

/// One bar: its label (shown under it when there is room, and as its tooltip) and value.
#[derive(Debug, Clone, PartialEq)]
pub struct Bar {
    pub label: String,
    pub value: f64,
}

const WIDTH: f64 = 640.0;
const HEIGHT: f64 = 160.0;
const AXIS: f64 = 18.0;

/// An integer count or amount as a drawn quantity (a bar's height, a percentage). `as` from an
/// integer to f64 rounds beyond 2^53, which changes nothing a chart or a rounded percentage
/// shows; it cannot wrap or fail (std has no checked form).
pub fn drawn(n: i128) -> f64 {
    n as f64
}

/// A bar's position or count (a few dozen at most) as a drawn quantity, exactly.
fn slots(i: usize) -> f64 {
    f64::from(u32::try_from(i).unwrap_or(u32::MAX))
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// An SVG bar chart of `bars`, titled `title` (for screen readers), with the largest value
/// written at the top left. Bars are scaled to the largest value; an empty or all-zero series
/// draws the axis only.
pub fn bars(title: &str, bars: &[Bar], format: impl Fn(f64) -> String) -> String {
    let max = bars.iter().map(|b| b.value).fold(0.0_f64, f64::max);
    let n = slots(bars.len().max(1));
    let slot = WIDTH / n;
    let plot = HEIGHT - AXIS;
    let mut svg = String::new();
    let _ = write!(
        svg,
        r#"<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{}" xmlns="http://www.w3.org/2000/svg"><title>{}</title>"#,
        escape(title),
        escape(title)
    );
    let _ = write!(
        svg,
        r#"<line x1="0" y1="{plot}" x2="{WIDTH}" y2="{plot}" class="axis"/><text x="2" y="12" class="max">{}</text>"#,
        escape(&format(max))
    );
    // A label under every few bars, so they do not overlap.
    let every = (bars.len() / 8).max(1);
    for (i, bar) in bars.iter().enumerate() {
        let h = if max > 0.0 {
            (bar.value / max * (plot - 16.0)).max(if bar.value > 0.0 { 1.0 } else { 0.0 })
        } else {
            0.0
        };
        let x = slots(i) * slot + slot * 0.1;
        let _ = write!(
            svg,
            r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{h:.1}" class="bar"><title>{}: {}</title></rect>"#,
            plot - h,
            slot * 0.8,
            escape(&bar.label),
            escape(&format(bar.value))
        );
        if i % every == 0 {
            let _ = write!(
                svg,
                r#"<text x="{:.1}" y="{:.1}" class="label">{}</text>"#,
                x,
                HEIGHT - 4.0,
                escape(&bar.label)
            );
        }
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bar(label: &str, value: f64) -> Bar {
        Bar {
            label: label.into(),
            value,
        }
    }

    #[test]
    fn bars_scale_to_the_largest_and_escape_labels() {
        let svg = bars(
            "Requests <per hour>",
            &[bar("a&b", 1.0), bar("b", 4.0), bar("c", 0.0)],
            |v| format!("{v}"),
        );
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
        assert!(svg.contains("Requests &lt;per hour&gt;"));
        assert!(svg.contains("a&amp;b") && !svg.contains("a&b"));
        // The largest bar fills the plot (160 - 18 - 16 = 126 high), the smallest a quarter.
        assert!(svg.contains(r#"height="126.0""#), "{svg}");
        assert!(svg.contains(r#"height="31.5""#), "{svg}");
        assert!(svg.contains(r#"height="0.0""#));
        assert_eq!(svg.matches("<rect").count(), 3);
    }

    #[test]
    fn an_empty_series_draws_the_axis_only() {
        let svg = bars("nothing", &[], |v| format!("{v}"));
        assert_eq!(svg.matches("<rect").count(), 0);
        assert!(svg.contains("class=\"axis\""));
    }
}
