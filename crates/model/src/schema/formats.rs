//! The string formats the grammar enforces, as regular expressions that admit only values a
//! standard validator accepts.
//!
//! llguidance has its own table, but some of its entries are looser than the validators
//! clients check answers with: its `date-time` admits seconds `60` anywhere, a lower-case
//! `t`/`z` and 29 February of every year; its `hostname` and `email` admit labels of any
//! length and `--` in the third and fourth place (reserved for IDNA A-labels). Each regex
//! here is a subset of the format's RFC grammar chosen so that Python's `jsonschema` (with its
//! format packages) and the Rust `jsonschema` crate both accept every string it matches.
//! Lengths are bounded, so a formatted value always finishes.

/// The formats enforced while decoding, each with the regex a value must match in full.
pub fn enforced(format: &str) -> Option<String> {
    let year = "(?:[0-9]{3}[1-9]|[0-9]{2}[1-9][0-9]|[0-9][1-9][0-9]{2}|[1-9][0-9]{3})";
    // Divisible by 4 and not by 100, or by 400; never 0000, which Python's dates refuse.
    let leap_year = "(?:[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:0[48]|[2468][048]|[13579][26])00)";
    let month_day = "(?:(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8]))";
    let date = format!("(?:{year}-{month_day}|{leap_year}-02-29)");
    // Seconds 00-59: a leap second is valid only at 23:59:60 UTC, which a regex over local
    // times with offsets cannot tell.
    let time = "(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\\.[0-9]{1,9})?(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])";
    // A DNS label of 1-59 characters, without two hyphens in a row (so never an `xx--` label).
    let label = "[a-zA-Z0-9](?:-?[a-zA-Z0-9]){0,29}";
    let last_label = "[a-zA-Z](?:-?[a-zA-Z0-9]){0,29}";
    let octet = "(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])";
    let ipv4 = format!("{octet}(?:\\.{octet}){{3}}");
    let digits = "[0-9]{1,9}";
    let regex = match format {
        "date" => date,
        "time" => time.to_string(),
        "date-time" => format!("{date}T{time}"),
        // RFC 3339 Appendix A.
        "duration" => {
            let second = format!("{digits}S");
            let minute = format!("{digits}M(?:{second})?");
            let hour = format!("{digits}H(?:{minute})?");
            let dur_time = format!("T(?:{hour}|{minute}|{second})");
            let day = format!("{digits}D");
            let month = format!("{digits}M(?:{day})?");
            let year = format!("{digits}Y(?:{month})?");
            format!("P(?:(?:{day}|{month}|{year})(?:{dur_time})?|{dur_time}|{digits}W)")
        }
        // A dot-atom local part of at most 50 characters at a domain of 2-4 labels.
        "email" => format!("[a-zA-Z0-9_+-]{{1,16}}(?:\\.[a-zA-Z0-9_+-]{{1,16}}){{0,2}}@(?:{label}\\.){{1,3}}{last_label}"),
        // At most 4 labels (under the 253 characters a name may have); the last one starts
        // with a letter, so that no name is all digits.
        "hostname" => format!("(?:{label}\\.){{0,3}}{last_label}"),
        "ipv4" => ipv4,
        "ipv6" => ipv6(),
        "uuid" => "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}".to_string(),
        "uri" => uri(&ipv4, true),
        "uri-reference" => uri(&ipv4, false),
        _ => return None,
    };
    Some(regex)
}

/// RFC 4291's text forms without an embedded IPv4 address: eight groups, or `::` standing for
/// one or more groups of zeros.
fn ipv6() -> String {
    let h16 = "[0-9a-fA-F]{1,4}";
    let mut forms = vec![format!("(?:{h16}:){{7}}{h16}")];
    // `before` groups, then `::` (one group of zeros at least), then at most 7 - before groups.
    for before in 0..=7usize {
        let head = match before {
            0 => String::new(),
            n => format!("(?:{h16}:){{{}}}{h16}", n - 1),
        };
        let after = 7 - before;
        let tail = if after == 0 { String::new() } else { format!("(?:{h16}(?::{h16}){{0,{}}})?", after - 1) };
        forms.push(format!("{head}::{tail}"));
    }
    format!("(?:{})", forms.join("|"))
}

/// RFC 3986 URIs (or, with `absolute` false, also relative references) whose authority is a
/// registered name or an IPv4 address: no user information and no bracketed IP literal, the
/// parts validators disagree on.
fn uri(ipv4: &str, absolute: bool) -> String {
    let unreserved = "[a-zA-Z0-9._~-]";
    let pct = "%[0-9a-fA-F]{2}";
    let pchar = format!("(?:[a-zA-Z0-9._~!$&'()*+,;=:@-]|{pct})");
    let segment = format!("{pchar}{{0,32}}");
    let segment_nz = format!("{pchar}{{1,32}}");
    let host = format!("(?:{ipv4}|(?:{unreserved}|{pct}){{1,64}})");
    let authority = format!("{host}(?::[0-9]{{1,5}})?");
    let path_abempty = format!("(?:/{segment}){{0,8}}");
    let path_absolute = format!("/(?:{segment_nz}(?:/{segment}){{0,7}})?");
    let path_rootless = format!("{segment_nz}(?:/{segment}){{0,7}}");
    let tail = format!("(?:\\?(?:{pchar}|[/?]){{0,64}})?(?:#(?:{pchar}|[/?]){{0,64}})?");
    let scheme = "[a-zA-Z][a-zA-Z0-9+.-]{0,15}";
    let absolute_uri = format!("{scheme}:(?://{authority}{path_abempty}|{path_absolute}|{path_rootless}|){tail}");
    if absolute {
        return absolute_uri;
    }
    // A relative reference's first segment has no `:`, else it would read as a scheme.
    let segment_nz_nc = format!("(?:[a-zA-Z0-9._~!$&'()*+,;=@-]|{pct}){{1,32}}");
    let path_noscheme = format!("{segment_nz_nc}(?:/{segment}){{0,7}}");
    let relative = format!("(?://{authority}{path_abempty}|{path_absolute}|{path_noscheme}|){tail}");
    format!("(?:{absolute_uri}|{relative})")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(format: &str, value: &str) -> bool {
        let regex = regex::Regex::new(&format!("^(?:{})$", enforced(format).unwrap())).unwrap();
        regex.is_match(value)
    }

    #[test]
    fn date_time_refuses_what_validators_refuse() {
        for good in ["2024-02-29T23:59:59Z", "2023-12-31T00:00:00.123+05:30", "0004-02-29T12:00:00-23:59", "2000-02-29T01:02:03Z"] {
            assert!(matches("date-time", good), "{good}");
        }
        // The answer the issue saw, leap seconds, lower case, 29 February of a common year,
        // year zero, a missing offset.
        for bad in [
            "4441-12-16t21:16:60z",
            "2024-06-30T23:59:60Z",
            "2024-01-01t00:00:00Z",
            "2024-01-01T00:00:00z",
            "2023-02-29T00:00:00Z",
            "1900-02-29T00:00:00Z",
            "0000-01-01T00:00:00Z",
            "2024-01-01T00:00:00",
            "2024-04-31T00:00:00Z",
        ] {
            assert!(!matches("date-time", bad), "{bad}");
        }
    }

    #[test]
    fn hostnames_and_emails_have_bounded_labels_without_double_hyphens() {
        assert!(matches("hostname", "example.com") && matches("hostname", "a-b.c-d.example"));
        assert!(!matches("hostname", "ab--cd.com"), "an xx-- label must be a real A-label");
        assert!(!matches("hostname", &format!("{}.com", "a".repeat(64))));
        assert!(!matches("hostname", "example.123"), "the last label starts with a letter");
        assert!(matches("email", "first.last+tag@mail.example.org"));
        assert!(!matches("email", "a..b@example.com") && !matches("email", "a@localhost"));
    }

    #[test]
    fn ipv6_forms_compress_zeros_at_most_once() {
        for good in ["::", "::1", "1::", "1:2:3:4:5:6:7:8", "1::8", "1:2:3:4:5:6::8", "fe80::1:2"] {
            assert!(matches("ipv6", good), "{good}");
        }
        for bad in ["1:2:3:4:5:6:7:8:9", "1::2::3", "1:2:3:4:5:6:7:8::", "::1:2:3:4:5:6:7:8", "12345::"] {
            assert!(!matches("ipv6", bad), "{bad}");
        }
    }

    #[test]
    fn uris_need_a_scheme_and_references_may_be_relative() {
        assert!(matches("uri", "https://example.com/a/b?q=1#top") && matches("uri", "urn:isbn:0451450523"));
        assert!(!matches("uri", "/relative/path") && !matches("uri", "http://exa mple.com"));
        assert!(matches("uri-reference", "/relative/path") && matches("uri-reference", "../up?x=1"));
        assert!(!matches("uri-reference", "a:b:c/d e"));
    }

    #[test]
    fn unknown_formats_are_not_enforced() {
        assert!(enforced("int32").is_none() && enforced("uri-template").is_none());
    }
}
