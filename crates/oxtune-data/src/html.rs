//! Self-contained HTML pages for reports: one file, inline CSS, no scripts or network.

/// Escapes text for HTML element content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,-apple-system,'Segoe UI','PingFang SC','Microsoft YaHei',sans-serif;margin:2rem auto;max-width:1100px;padding:0 1rem;color:#1f2328}\
h1{font-size:1.5rem}h2{font-size:1.15rem;margin-top:2rem;border-bottom:1px solid #d0d7de;padding-bottom:.3rem}\
table{border-collapse:collapse;width:100%;margin:.5rem 0;font-size:.9rem}th,td{border:1px solid #d0d7de;padding:.35rem .6rem;text-align:left;vertical-align:top}\
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}code{background:#f6f8fa;padding:0 .25rem;border-radius:3px}\
.cards{display:flex;gap:1rem;flex-wrap:wrap}.card{border:1px solid #d0d7de;border-radius:6px;padding:.6rem 1rem;min-width:9rem}\
.card b{display:block;font-size:1.4rem}.muted{color:#656d76;font-size:.85rem}.bad{color:#cf222e}.good{color:#1a7f37}\
pre{white-space:pre-wrap;word-break:break-word;margin:0;font-family:inherit}";

/// A complete page around `body` (which must already be escaped HTML).
pub fn page(title: &str, body: &str) -> String {
    format!(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<title>{}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<h1>{}</h1>\n{body}\n</body>\n</html>\n",
        escape(title),
        escape(title)
    )
}

/// A summary card: a big number and a caption.
pub fn card(value: &str, caption: &str) -> String {
    format!(
        "<div class=\"card\"><b>{}</b><span class=\"muted\">{}</span></div>",
        escape(value),
        escape(caption)
    )
}

/// A table with a header row; cells are already escaped HTML.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<table><thead><tr>");
    for header in headers {
        out.push_str(&format!("<th>{}</th>", escape(header)));
    }
    out.push_str("</tr></thead><tbody>");
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let numeric = !cell.is_empty()
                && cell
                    .chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | ',' | '-' | '%'));
            out.push_str(if numeric {
                "<td class=\"num\">"
            } else {
                "<td>"
            });
            out.push_str(cell);
            out.push_str("</td>");
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
    out
}

/// An inline SVG bar chart of `counts` over equal-width bins from `low` to `high`.
pub fn histogram_svg(counts: &[u64], low: f64, high: f64, x_label: &str) -> String {
    const WIDTH: f64 = 720.0;
    const HEIGHT: f64 = 240.0;
    const LEFT: f64 = 48.0;
    const BOTTOM: f64 = 36.0;
    const TOP: f64 = 12.0;
    let plot_width = WIDTH - LEFT - 12.0;
    let plot_height = HEIGHT - BOTTOM - TOP;
    let max = counts.iter().copied().max().unwrap_or(0).max(1) as f64;
    let bar_width = plot_width / counts.len().max(1) as f64;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" role=\"img\" font-family=\"sans-serif\" font-size=\"11\">"
    );
    svg.push_str(&format!(
        "<line x1=\"{LEFT}\" y1=\"{y}\" x2=\"{x2}\" y2=\"{y}\" stroke=\"#656d76\"/>",
        y = TOP + plot_height,
        x2 = LEFT + plot_width
    ));
    for (index, count) in counts.iter().enumerate() {
        let height = plot_height * (*count as f64) / max;
        let x = LEFT + bar_width * index as f64;
        let bin_low = low + (high - low) * index as f64 / counts.len() as f64;
        let bin_high = low + (high - low) * (index + 1) as f64 / counts.len() as f64;
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{height:.1}\" fill=\"#0969da\"><title>{bin_low:.3}–{bin_high:.3}: {count}</title></rect>",
            x + 1.0,
            TOP + plot_height - height,
            (bar_width - 2.0).max(1.0)
        ));
    }
    for tick in 0..=4 {
        let value = low + (high - low) * f64::from(tick) / 4.0;
        let x = LEFT + plot_width * f64::from(tick) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            TOP + plot_height + 14.0,
            trim_number(value)
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{:.1}\" text-anchor=\"end\" dx=\"-4\">{}</text>",
        TOP + 8.0,
        max as u64
    ));
    svg.push_str(&format!(
        "<text x=\"{LEFT}\" y=\"{:.1}\" text-anchor=\"end\" dx=\"-4\">0</text>",
        TOP + plot_height
    ));
    svg.push_str(&format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
        LEFT + plot_width / 2.0,
        HEIGHT - 4.0,
        escape(x_label)
    ));
    svg.push_str("</svg>");
    svg
}

fn trim_number(value: f64) -> String {
    let text = format!("{value:.2}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(
            escape("<PHONE> & \"x\""),
            "&lt;PHONE&gt; &amp; &quot;x&quot;"
        );
    }

    #[test]
    fn histogram_has_one_bar_per_bin() {
        let svg = histogram_svg(&[1, 0, 3], 0.0, 1.0, "score");
        assert_eq!(svg.matches("<rect").count(), 3);
        assert!(svg.starts_with("<svg") && svg.ends_with("</svg>"));
    }
}
