//! The web console (`/`) and the API docs (`/docs`): static files embedded in the binary
//! at build time, so both work with no network access and no build step. They hold no
//! data and need no key; every API call they make carries the key the user typed in.

use axum::http::header::{CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE};
use axum::http::HeaderName;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

/// A static file: its path, content type and bytes.
struct Asset {
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const ASSETS: &[Asset] = &[
    Asset {
        path: "/",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("console/index.html"),
    },
    Asset {
        path: "/console/console.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/console.js"),
    },
    Asset {
        path: "/console/console.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("console/console.css"),
    },
    Asset {
        path: "/docs",
        content_type: "text/html; charset=utf-8",
        body: include_bytes!("console/docs.html"),
    },
    Asset {
        path: "/docs/docs.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/docs.js"),
    },
    // Swagger UI, vendored from a pinned PyPI wheel (scripts/vendor-swagger-ui.sh).
    Asset {
        path: "/docs/swagger-ui-bundle.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("console/vendor/swagger-ui/swagger-ui-bundle.js"),
    },
    Asset {
        path: "/docs/swagger-ui.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("console/vendor/swagger-ui/swagger-ui.css"),
    },
];

/// Scripts and styles from this server only; Swagger UI sets inline styles and draws
/// data: images. No page may be framed (clickjacking).
const CSP: &str = "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
                   frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// Whether `path` is one of the console's or the docs' files (served without a key).
pub fn is_console_path(path: &str) -> bool {
    ASSETS.iter().any(|a| a.path == path)
}

pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    ASSETS.iter().fold(Router::new(), |router, a| {
        router.route(
            a.path,
            get(move || async move {
                (
                    [
                        (CONTENT_TYPE, a.content_type),
                        // Embedded in the binary: an upgrade changes them, so revalidate.
                        (CACHE_CONTROL, "no-cache"),
                        (CONTENT_SECURITY_POLICY, CSP),
                        (HeaderName::from_static("x-content-type-options"), "nosniff"),
                    ],
                    a.body,
                )
                    .into_response()
            }),
        )
    })
}

#[cfg(test)]
mod tests {
    use sha2::{Digest, Sha256};

    /// The vendored files are the ones the pinned wheel shipped (vendor/SHA256SUMS).
    #[test]
    fn vendored_files_match_their_checksums() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http/console/vendor");
        let sums = std::fs::read_to_string(dir.join("SHA256SUMS")).unwrap();
        let mut checked = 0;
        for line in sums.lines() {
            let (want, file) = line.split_once("  ").unwrap();
            let bytes = std::fs::read(dir.join(file)).unwrap();
            assert_eq!(hex::encode(Sha256::digest(&bytes)), want, "{file}");
            checked += 1;
        }
        assert_eq!(checked, 3);
    }
}
