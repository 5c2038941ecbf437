//! The Jinja environment Hugging Face renders chat templates in, rebuilt on minijinja:
//! `trim_blocks` and `lstrip_blocks` on, Python's string / dict / list methods
//! (minijinja-contrib's pycompat), loop controls, `raise_exception`, `strftime_now`, a `tojson`
//! that writes what Python's `json.dumps` writes, and the `{% generation %}` block.
use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Environment, Error, ErrorKind, Value};

/// Marks where a `{% generation %}` block's output starts; Unicode noncharacters, which no
/// text a model is trained on carries.
pub(crate) const GENERATION_START: char = '\u{FDD0}';
/// Marks where a `{% generation %}` block's output ends.
pub(crate) const GENERATION_END: char = '\u{FDD1}';
/// The filter a `{% generation %}` block becomes (see [`rewrite_generation_blocks`]).
const GENERATION_FILTER: &str = "octet_generation";

/// An environment configured as transformers' `_compile_jinja_template`.
pub(crate) fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    let syntax = env
        .syntax()
        .to_builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .expect("the default delimiters are valid");
    env.set_syntax(syntax);
    env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
    env.add_function("raise_exception", |msg: String| -> Result<Value, Error> {
        Err(Error::new(ErrorKind::InvalidOperation, msg))
    });
    env.add_function("strftime_now", |format: String| strftime_now(&format));
    env.add_filter("tojson", tojson);
    env.add_filter(GENERATION_FILTER, |body: String| {
        format!("{GENERATION_START}{body}{GENERATION_END}")
    });
    env
}

/// Whether `source` has `{% generation %}` blocks (transformers' own test for them).
pub(crate) fn has_generation_blocks(source: &str) -> bool {
    generation_tag("generation").is_match(source)
}

/// `{% generation %}…{% endgeneration %}` as a filter block around the same body, which
/// minijinja knows: a block tag like the original, so `trim_blocks`, `lstrip_blocks` and `-`
/// trim the same whitespace, and no line moves.
pub(crate) fn rewrite_generation_blocks(source: &str) -> String {
    let opened = generation_tag("generation").replace_all(
        source,
        format!("{{%$1 filter {GENERATION_FILTER} $2%}}").as_str(),
    );
    generation_tag("endgeneration")
        .replace_all(&opened, "{%$1 endfilter $2%}")
        .into_owned()
}

fn generation_tag(name: &str) -> regex::Regex {
    regex::Regex::new(&format!(r"\{{%([-+]?)\s*{name}\s*([-+]?)%\}}"))
        .expect("a fixed, valid pattern")
}

/// Python's `json.dumps(value, ensure_ascii=False, indent=indent)`: `", "` and `": "` between
/// items (`","` and `": "` with an indent), keys in the order given, nothing HTML-escaped
/// (minijinja's own `tojson` escapes `<`, `>`, `&` and `'`, which changes the rendered text).
fn tojson(value: Value, kwargs: Kwargs) -> Result<Value, Error> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    kwargs.assert_all_used()?;
    let mut out = String::new();
    write_json(&value, indent, sort_keys.unwrap_or(false), 0, &mut out)?;
    Ok(Value::from_safe_string(out))
}

fn write_json(
    v: &Value,
    indent: Option<usize>,
    sort: bool,
    depth: usize,
    out: &mut String,
) -> Result<(), Error> {
    let newline = |out: &mut String, depth: usize| {
        if let Some(n) = indent {
            out.push('\n');
            out.push_str(&" ".repeat(n * depth));
        }
    };
    let item_sep = if indent.is_some() { "," } else { ", " };
    match v.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("null"),
        ValueKind::Bool => out.push_str(if v.is_true() { "true" } else { "false" }),
        ValueKind::Number => match v.as_i64() {
            Some(i) => out.push_str(&i.to_string()),
            None => out.push_str(&python_float(f64::try_from(v.clone())?)),
        },
        ValueKind::String => out.push_str(&json_string(v.as_str().unwrap_or_default())),
        ValueKind::Seq | ValueKind::Iterable => {
            let items: Vec<Value> = v.try_iter()?.collect();
            if items.is_empty() {
                out.push_str("[]");
                return Ok(());
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                write_json(item, indent, sort, depth + 1, out)?;
            }
            newline(out, depth);
            out.push(']');
        }
        ValueKind::Map => {
            let mut keys: Vec<Value> = v.try_iter()?.collect();
            if sort {
                keys.sort();
            }
            if keys.is_empty() {
                out.push_str("{}");
                return Ok(());
            }
            out.push('{');
            for (i, key) in keys.iter().enumerate() {
                if i > 0 {
                    out.push_str(item_sep);
                }
                newline(out, depth + 1);
                out.push_str(&json_string(&key.to_string()));
                out.push_str(": ");
                write_json(&v.get_item(key)?, indent, sort, depth + 1, out)?;
            }
            newline(out, depth);
            out.push('}');
        }
        _ => {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("tojson cannot write a value of kind {}", v.kind()),
            ))
        }
    }
    Ok(())
}

/// A JSON string literal as Python writes it with `ensure_ascii=False` (serde_json escapes
/// the same characters).
fn json_string(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

/// A float as Python's `repr` writes it in JSON (`1.0`, `0.5`, `1e-07`, `NaN`).
fn python_float(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity" } else { "-Infinity" }.into();
    }
    let s = format!("{x:?}");
    if s.contains('e') {
        // Rust writes 1e-7, Python 1e-07.
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let (sign, digits) = e.strip_prefix('-').map_or(("+", e), |d| ("-", d));
        return format!("{m}e{sign}{digits:0>2}");
    }
    s
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

/// Python's `datetime.now().strftime(format)` in UTC, for the directives chat templates use
/// (`%d %m %y %Y %b %B %a %A %H %M %S %j %%`); Llama 3.1+ templates date their system turn
/// with it.
fn strftime_now(format: &str) -> Result<String, Error> {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    strftime(secs, format)
}

fn strftime(unix_secs: i64, format: &str) -> Result<String, Error> {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (year, month, day) = civil_from_days(days);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let day_of_year = days - days_from_civil(year, 1, 1) + 1;
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        let month_name = MONTHS[month as usize - 1];
        match chars.next() {
            Some('d') => out.push_str(&format!("{day:02}")),
            Some('m') => out.push_str(&format!("{month:02}")),
            Some('y') => out.push_str(&format!("{:02}", year.rem_euclid(100))),
            Some('Y') => out.push_str(&year.to_string()),
            Some('b') => out.push_str(&month_name[..3]),
            Some('B') => out.push_str(month_name),
            Some('a') => out.push_str(&WEEKDAYS[weekday][..3]),
            Some('A') => out.push_str(WEEKDAYS[weekday]),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('j') => out.push_str(&format!("{day_of_year:03}")),
            Some('%') => out.push('%'),
            other => {
                return Err(Error::new(
                    ErrorKind::InvalidOperation,
                    format!(
                        "strftime_now: the directive %{} is not supported",
                        other.map(String::from).unwrap_or_default()
                    ),
                ))
            }
        }
    }
    Ok(out)
}

/// (year, month, day) of a day count since 1970-01-01 (Hinnant's civil-from-days).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Days since 1970-01-01 of a civil date (the inverse of [`civil_from_days`]).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::from(m);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strftime_matches_python() {
        // datetime(2024, 7, 26, 13, 5, 9).strftime(...) in Python.
        let t = 1_721_999_109;
        assert_eq!(strftime(t, "%d %b %Y").unwrap(), "26 Jul 2024");
        assert_eq!(
            strftime(t, "%A %B %m/%d/%y %H:%M:%S %j %%").unwrap(),
            "Friday July 07/26/24 13:05:09 208 %"
        );
        assert_eq!(strftime(0, "%Y-%m-%d %a").unwrap(), "1970-01-01 Thu");
        assert!(strftime(0, "%Q").is_err());
    }

    #[test]
    fn tojson_writes_what_json_dumps_writes() {
        let env = environment();
        let v = Value::from(minijinja::value::Serde(serde_json::json!(
            {"b": [1, 2.5, "x<y&'é\n"], "a": {}, "c": null, "d": true, "e": []}
        )));
        let r = |src: &str| {
            env.render_str(src, minijinja::context! { v => v.clone() })
                .unwrap()
        };
        // json.dumps(v, ensure_ascii=False) (serde_json's map holds the keys sorted)
        assert_eq!(
            r("{{ v | tojson }}"),
            r#"{"a": {}, "b": [1, 2.5, "x<y&'é\n"], "c": null, "d": true, "e": []}"#
        );
        assert_eq!(
            r("{{ v.b | tojson(indent=2) }}"),
            "[\n  1,\n  2.5,\n  \"x<y&'é\\n\"\n]"
        );
        assert_eq!(python_float(1e-7), "1e-07");
        assert_eq!(python_float(1.0), "1.0");
    }

    #[test]
    fn generation_blocks_become_filter_blocks() {
        let src = "a{%- generation -%}b{% endgeneration %}\n{% generation%}c{%endgeneration%}";
        assert!(has_generation_blocks(src));
        assert!(!has_generation_blocks("{{ generation }}"));
        let out = rewrite_generation_blocks(src);
        assert_eq!(
            out,
            "a{%- filter octet_generation -%}b{% endfilter %}\n\
             {% filter octet_generation %}c{% endfilter %}"
        );
    }
}
