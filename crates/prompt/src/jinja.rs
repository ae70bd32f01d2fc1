//! The Python-side helpers Hugging Face chat templates expect: `tojson` as Python's
//! `json.dumps`, `raise_exception`, and `strftime_now`.
//!
//! Chat templates are written against `transformers`, which renders them with Jinja2 plus a few
//! globals of its own. A prompt must come out byte-identical to what the model was trained on,
//! so these helpers reproduce the Python behaviour rather than minijinja's defaults:
//! minijinja's built-in `tojson` escapes `<`, `>`, `&` and `'` for HTML, which `json.dumps` does
//! not (tool schemas full of `<` would otherwise render differently from vLLM or transformers).
//!
//! Invariants:
//! - `tojson` output equals `json.dumps(x, ensure_ascii=False)` (separators `", "` / `": "`, or
//!   `","` / `": "` with `indent`), keys in the value's own order unless `sort_keys=true`.
//!   Known gap: floats use Rust's shortest form, so exponents print as `1e16`, not `1e+16`.
//! - `raise_exception(msg)` always fails the render with a [`RaisedException`] carrying `msg`
//!   as the error's source, which `template.rs` turns into a typed error.
//! - `strftime_now` uses UTC (the worker has no reason to know the user's zone).

use std::time::{SystemTime, UNIX_EPOCH};

use minijinja::value::{Kwargs, Value};
use minijinja::{Error, ErrorKind};
use serde::Serialize;
use serde_json::ser::Formatter;

/// The message of a template's `raise_exception(...)`, attached as the render error's source.
#[derive(Debug, Clone)]
pub(crate) struct RaisedException(pub String);

impl std::fmt::Display for RaisedException {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for RaisedException {}

/// `raise_exception(message)`: aborts rendering with the template's own message.
pub(crate) fn raise_exception(message: String) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.clone())
        .with_source(RaisedException(message)))
}

/// `strftime_now(format)`: the current UTC time, formatted.
pub(crate) fn strftime_now(format: String) -> Result<Value, Error> {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    Ok(Value::from(strftime_utc(secs, &format)))
}

/// `value | tojson(indent=None, sort_keys=False, ensure_ascii=False, separators=None)`.
pub(crate) fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;

    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be a pair of strings",
            ));
        }
        None if indent.is_some() => (",".to_owned(), ": ".to_owned()),
        None => (", ".to_owned(), ": ".to_owned()),
    };
    let formatter = PyJsonFormatter {
        indent: indent.map(|n| " ".repeat(n)),
        item_sep,
        key_sep,
        ensure_ascii: ensure_ascii.unwrap_or(false),
        open: Vec::new(),
    };
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    let result = if sort_keys.unwrap_or(false) {
        // serde_json's own map is ordered by key.
        serde_json::to_value(value).and_then(|v| v.serialize(&mut serializer))
    } else {
        value.serialize(&mut serializer)
    };
    result.map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            "tojson: cannot serialise value",
        )
        .with_source(e)
    })?;
    let text = String::from_utf8(out).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            "tojson: produced invalid UTF-8",
        )
        .with_source(e)
    })?;
    Ok(Value::from_safe_string(text))
}

/// `json.dumps(value, ensure_ascii=False)`: what templates print with `tojson`, and how tool
/// calls are written back into prompts and answers.
pub fn python_json(value: &serde_json::Value) -> String {
    let formatter = PyJsonFormatter {
        indent: None,
        item_sep: ", ".to_owned(),
        key_sep: ": ".to_owned(),
        ensure_ascii: false,
        open: Vec::new(),
    };
    let mut out = Vec::new();
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, formatter);
    // Writing a JSON value to memory cannot fail, and the formatter writes only UTF-8.
    value
        .serialize(&mut serializer)
        .expect("a JSON value serialises");
    String::from_utf8(out).expect("the formatter writes UTF-8")
}

/// A `serde_json` formatter that writes what Python's `json.dumps` writes.
struct PyJsonFormatter {
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    ensure_ascii: bool,
    /// One entry per open container: whether it has had an item yet.
    open: Vec<bool>,
}

type IoResult = std::io::Result<()>;

impl PyJsonFormatter {
    fn newline<W: ?Sized + std::io::Write>(&self, w: &mut W) -> IoResult {
        if let Some(indent) = &self.indent {
            w.write_all(b"\n")?;
            for _ in 0..self.open.len() {
                w.write_all(indent.as_bytes())?;
            }
        }
        Ok(())
    }

    fn begin<W: ?Sized + std::io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> IoResult {
        self.open.push(false);
        w.write_all(bracket)
    }

    /// Python writes empty containers as `[]` / `{}` and, with `indent`, closes a non-empty one
    /// on its own line.
    fn end<W: ?Sized + std::io::Write>(&mut self, w: &mut W, bracket: &[u8]) -> IoResult {
        if self.open.pop().unwrap_or(false) {
            self.newline(w)?;
        }
        w.write_all(bracket)
    }

    fn item<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> IoResult {
        if let Some(has_items) = self.open.last_mut() {
            *has_items = true;
        }
        if !first {
            w.write_all(self.item_sep.as_bytes())?;
        }
        self.newline(w)
    }
}

impl Formatter for PyJsonFormatter {
    fn begin_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> IoResult {
        self.begin(w, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> IoResult {
        self.end(w, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        first: bool,
    ) -> IoResult {
        self.item(w, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> IoResult {
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> IoResult {
        self.begin(w, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> IoResult {
        self.end(w, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> IoResult {
        self.item(w, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> IoResult {
        w.write_all(self.key_sep.as_bytes())
    }

    fn end_object_value<W: ?Sized + std::io::Write>(&mut self, _w: &mut W) -> IoResult {
        Ok(())
    }

    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        w: &mut W,
        fragment: &str,
    ) -> IoResult {
        if !self.ensure_ascii || fragment.is_ascii() {
            return w.write_all(fragment.as_bytes());
        }
        let mut units = [0u16; 2];
        for c in fragment.chars() {
            if c.is_ascii() {
                w.write_all(&[c as u8])?;
            } else {
                // Python writes lowercase hex and UTF-16 surrogate pairs.
                for unit in c.encode_utf16(&mut units) {
                    write!(w, "\\u{unit:04x}")?;
                }
            }
        }
        Ok(())
    }
}

const MONTHS: [&str; 12] = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
];
const WEEKDAYS: [&str; 7] = [
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

/// A small `strftime` over UTC for the directives chat templates use (`%d %b %Y` and friends);
/// unknown directives are copied through unchanged, as glibc does.
pub(crate) fn strftime_utc(unix_secs: u64, format: &str) -> String {
    let days = unix_secs / 86_400;
    let secs_of_day = unix_secs % 86_400;
    let (year, month, day) = civil_from_days(days);
    let weekday = ((days + 3) % 7) as usize; // 1970-01-01 was a Thursday (index 3 from Monday)
    let (hour, minute, second) = (secs_of_day / 3600, secs_of_day / 60 % 60, secs_of_day % 60);
    let month_name = MONTHS[(month - 1) as usize];
    let day_name = WEEKDAYS[weekday];

    let mut out = String::with_capacity(format.len() + 16);
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('Y') => out.push_str(&year.to_string()),
            Some('y') => out.push_str(&format!("{:02}", year % 100)),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('e') => out.push_str(&format!("{day:2}")),
            Some('B') => out.push_str(month_name),
            Some('b') | Some('h') => out.push_str(&month_name[..3]),
            Some('A') => out.push_str(day_name),
            Some('a') => out.push_str(&day_name[..3]),
            Some('H') => out.push_str(&format!("{hour:02}")),
            Some('I') => out.push_str(&format!("{:02}", (hour + 11) % 12 + 1)),
            Some('p') => out.push_str(if hour < 12 { "AM" } else { "PM" }),
            Some('M') => out.push_str(&format!("{minute:02}")),
            Some('S') => out.push_str(&format!("{second:02}")),
            Some('F') => out.push_str(&format!("{year}-{month:02}-{day:02}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

/// Days since 1970-01-01 to (year, month 1..=12, day 1..=31), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_known_instants() {
        assert_eq!(strftime_utc(0, "%d %b %Y %A"), "01 Jan 1970 Thursday");
        // 2024-02-29T13:05:09Z, a leap day.
        assert_eq!(
            strftime_utc(1_709_211_909, "%Y-%m-%d %H:%M:%S %I%p %a %B %% %q"),
            "2024-02-29 13:05:09 01PM Thu February % %q"
        );
        assert_eq!(strftime_utc(1_735_689_600, "%F %e"), "2025-01-01  1");
    }
}
