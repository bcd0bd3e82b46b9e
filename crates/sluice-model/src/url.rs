//! Backend URLs as shown in errors, logs and banners: without their password.

/// `url` with the password of its credentials replaced by `***` (the user name stays: it helps
/// to tell which account failed). Only the authority is looked at, so an `@` in the path or
/// query is left alone.
pub fn redacted(url: &str) -> String {
    let Some(scheme_end) = url.find("://").map(|i| i + 3) else {
        return url.to_string();
    };
    let rest = &url[scheme_end..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    let credentials = &rest[..at];
    let shown = match credentials.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => credentials.to_string(),
    };
    format!("{}{shown}{}", &url[..scheme_end], &rest[at..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_shown_urls() {
        for (url, shown) in [
            (
                "redis://user:secret@host:6379/0",
                "redis://user:***@host:6379/0",
            ),
            ("redis://:secret@host:6379", "redis://:***@host:6379"),
            (
                "postgres://app:p%40ss@db:5432/sluice",
                "postgres://app:***@db:5432/sluice",
            ),
            ("postgres://app@db/sluice", "postgres://app@db/sluice"),
            (
                "https://elastic:x@es.example:9200",
                "https://elastic:***@es.example:9200",
            ),
            ("http://es:9200", "http://es:9200"),
            (
                "postgres://db/sluice?application_name=a:b@c",
                "postgres://db/sluice?application_name=a:b@c",
            ),
            ("embedded", "embedded"),
        ] {
            assert_eq!(redacted(url), shown, "{url}");
        }
    }
}
