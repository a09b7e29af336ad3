//! Text that may carry secrets, made fit for a log line or a message: URLs with their
//! passwords and query values blanked, and client errors that quote such a URL.

/// `text` as it may be shown in a log or a message: a URL with its password and every query
/// value replaced by `***` and its fragment dropped; several URLs separated by commas (the nodes
/// of a cluster), each so.
///
/// The URL is parsed as the clients parse it rather than cut by pattern: a password with an
/// unencoded `/`, `#` or `?` ends the authority early, and what then looks like a host, a port
/// or a path is part of the password. So text that does not parse, or that parses with an `@`
/// the parser did not take as the end of the user information (`amqp://user:1234/x@host`
/// parses with the password's "1234" as a port), shows only its scheme: `amqp://***`.
pub(crate) fn redact_url(text: &str) -> String {
    let pieces: Vec<&str> = text.split(',').collect();
    if pieces.len() > 1 && pieces.iter().all(|p| p.contains("://")) {
        return pieces
            .iter()
            .map(|p| redact_one_url(p.trim()))
            .collect::<Vec<_>>()
            .join(",");
    }
    redact_one_url(text)
}

fn redact_one_url(text: &str) -> String {
    let Ok(url) = url::Url::parse(text) else {
        return opaque_url(text);
    };
    // What follows the user information, as the parser serialised it: an `@` there (in the
    // path, the query or the fragment) is one the user information was meant to end at.
    if url.cannot_be_a_base()
        || url.host().is_none()
        || url[url::Position::BeforeHost..].contains('@')
    {
        return opaque_url(text);
    }
    let mut shown = url.clone();
    if url.password().is_some() && shown.set_password(Some("***")).is_err() {
        return opaque_url(text);
    }
    if let Some(query) = url.query() {
        let blanked: Vec<String> = query
            .split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| match pair.split_once('=') {
                Some((name, _)) => format!("{name}=***"),
                // A bare word may be a token itself.
                None => "***".to_string(),
            })
            .collect();
        shown.set_query(Some(&blanked.join("&")));
    }
    shown.set_fragment(None);
    shown.to_string()
}

/// Only the scheme, when it looks like one, of text that cannot be shown safely.
fn opaque_url(text: &str) -> String {
    let scheme = text.split_once(':').map(|(s, _)| s).filter(|s| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    match scheme {
        Some(scheme) => format!("{scheme}://***"),
        None => "***".to_string(),
    }
}

/// `message`, an error of a client library given `url`, without `url`'s secrets: some quote
/// the URL they could not parse (lapin: `Invalid URL: '...'`). The URL is replaced by its
/// redacted form, and the password as written (everything between the user name and the last
/// `@`, unencoded delimiters and all) by `***`.
pub(crate) fn redact_error(message: &str, url: &str) -> String {
    let mut shown = if url.is_empty() {
        message.to_string()
    } else {
        message.replace(url, &redact_url(url))
    };
    for piece in std::iter::once(url).chain(url.split(',')) {
        if let Some(password) = written_password(piece) {
            shown = shown.replace(password, "***");
        }
    }
    shown
}

/// The password of `url` as written: after the first `:` of the user information, up to the
/// last `@`, whether or not a parser would find it there.
fn written_password(url: &str) -> Option<&str> {
    let rest = match url.split_once("://") {
        Some((_, rest)) => rest,
        None => url.split_once(':')?.1,
    };
    let (userinfo, _) = rest.rsplit_once('@')?;
    let (_, password) = userinfo.split_once(':')?;
    (!password.is_empty()).then_some(password)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords_query_values_and_fragments() {
        let cases = [
            (
                "amqp://guest:guest@127.0.0.1:5672/%2f",
                "amqp://guest:***@127.0.0.1:5672/%2f",
            ),
            ("redis://:p%40ss@redis:6379/0", "redis://:***@redis:6379/0"),
            ("rediss://user@host", "rediss://user@host"),
            ("redis://127.0.0.1:6379", "redis://127.0.0.1:6379"),
            // An `@` in the password, unencoded: the last one ends the user information.
            ("amqps://u:a@b@host/vh?x=1", "amqps://u:***@host/vh?x=***"),
            // Encoded delimiters are part of the password, and go with it.
            (
                "amqp://u:a%2Fb%23c%3Fd@host:5672/%2f",
                "amqp://u:***@host:5672/%2f",
            ),
            // Unencoded `/`, `#`, `?` end the authority early: nothing parses as written.
            ("amqp://guest:pa/ss@127.0.0.1:5672/%2f", "amqp://***"),
            ("amqp://guest:pa#ss@127.0.0.1:5672/%2f", "amqp://***"),
            ("redis://:pa?ss@127.0.0.1:6379", "redis://***"),
            // ... or parse, with part of the password as a port, and an `@` left over.
            ("amqp://user:1234/x@host/%2f", "amqp://***"),
            ("redis://user:1234#x@host:6379", "redis://***"),
            ("redis://user:1234?x@host:6379", "redis://***"),
            (
                "rediss://127.0.0.1:6380/0?s3cr#t@127.0.0.1:6379",
                "rediss://***",
            ),
            // Tokens in the query, and a fragment.
            (
                "https://gw.example/ops?token=s3cr3t&region=eu",
                "https://gw.example/ops?token=***&region=***",
            ),
            ("https://gw.example/?s3cr3t", "https://gw.example/?***"),
            ("https://gw.example/ops#s3cr3t", "https://gw.example/ops"),
            (
                "redis-sentinel://:pw@s1:26379/0?sentinelServiceName=main&sentinelPassword=pw2",
                "redis-sentinel://:***@s1:26379/0?sentinelServiceName=***&sentinelPassword=***",
            ),
            // IPv6 hosts.
            (
                "amqp://guest:guest@[::1]:5672/%2f",
                "amqp://guest:***@[::1]:5672/%2f",
            ),
            ("redis://:pw@[fe80::1]:6379", "redis://:***@[fe80::1]:6379"),
            ("redis://:pw@[::1:6379", "redis://***"),
            // Not URLs, or not ones with a host.
            ("not a url", "***"),
            ("", "***"),
            ("amqp:guest:pw@host", "amqp://***"),
            ("p@ss word:x", "***"),
            // The nodes of a cluster, each on its own.
            (
                "amqp://u:p1@n1:5672/%2f,amqp://u:p/2@n2:5672/%2f",
                "amqp://u:***@n1:5672/%2f,amqp://***",
            ),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }

    #[test]
    fn no_piece_of_a_hostile_password_survives() {
        for password in [
            "Seg1/Seg2#Seg3?Seg4",
            "4711/Seg2#Seg3?Seg4",
            "Seg1@Seg2/Seg3",
        ] {
            for url in [
                format!("amqp://guest:{password}@127.0.0.1:5672/%2f"),
                format!("redis://:{password}@127.0.0.1:6379/0"),
                format!("https://u:{password}@[::1]:8443/x?token=Seg5"),
            ] {
                let shown = redact_url(&url);
                for piece in ["Seg1", "Seg2", "Seg3", "Seg4", "Seg5", "4711"] {
                    assert!(!shown.contains(piece), "{url} -> {shown}");
                }
            }
        }
    }

    #[test]
    fn client_errors_lose_the_url_and_the_password() {
        let url = "amqp:guest:Seg1/Seg2@127.0.0.1:5672";
        let lapin = format!("failed to parse: Invalid URL: '{url}'");
        let shown = redact_error(&lapin, url);
        assert_eq!(shown, "failed to parse: Invalid URL: 'amqp://***'");
        let url = "redis://:p/ss#w?rd@127.0.0.1:1";
        let shown = redact_error("cannot connect with p/ss#w?rd to 127.0.0.1:1", url);
        assert_eq!(shown, "cannot connect with *** to 127.0.0.1:1");
        assert_eq!(
            redact_error("Connection refused (os error 111)", "redis://127.0.0.1:1"),
            "Connection refused (os error 111)"
        );
    }
}
