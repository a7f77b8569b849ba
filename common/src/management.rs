//! A small client of RabbitMQ's management HTTP API, for what AMQP cannot do: vhosts, users and
//! their permissions.
//!
//! Credentials travel in the `Authorization` header only; no error message carries them.

use std::time::Duration;

/// What went wrong with a management call.
#[derive(Debug, thiserror::Error)]
pub enum ManagementError {
    /// The API answered with an error status (401: wrong credentials; 403: the user lacks the
    /// `administrator` tag).
    #[error("management API {method} {path} at {base} answered {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        base: String,
        method: String,
        path: String,
        status: u16,
        body: String,
    },
    /// The API could not be reached (no management plugin, another port, a firewall).
    #[error("management API at {base} cannot be reached: {source}")]
    Unreachable {
        base: String,
        #[source]
        source: reqwest::Error,
    },
}

/// A management API endpoint and the user to call it as.
#[derive(Clone)]
pub struct Management {
    base: String,
    user: String,
    password: String,
    http: reqwest::Client,
}

impl std::fmt::Debug for Management {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Management")
            .field("base", &self.base)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

impl Management {
    /// The API at `base` (e.g. `http://127.0.0.1:15672`), called as `user`.
    pub fn new(base: &str, user: &str, password: &str) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap_or_default();
        Self {
            base: base.trim_end_matches('/').to_owned(),
            user: user.to_owned(),
            password: password.to_owned(),
            http,
        }
    }

    /// The API of the broker at `amqp_url`, called with that URL's credentials: at `base` when
    /// given, else on the broker's host at port 15672 (RabbitMQ's default).
    pub fn for_broker(amqp_url: &str, base: Option<&str>) -> Self {
        let (user, password) = crate::amqp::credentials(amqp_url).map_or_else(
            || ("guest".to_owned(), "guest".to_owned()),
            |(u, p)| {
                let decode =
                    |s: &str| crate::amqp::percent_decode(s).unwrap_or_else(|| s.to_owned());
                (decode(u), decode(p))
            },
        );
        let base = base.map_or_else(
            || format!("http://{}:15672", crate::amqp::host(amqp_url)),
            str::to_owned,
        );
        Self::new(&base, &user, &password)
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// The user it calls as.
    pub fn user(&self) -> &str {
        &self.user
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> Result<reqwest::Response, ManagementError> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .basic_auth(&self.user, Some(&self.password));
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request
            .send()
            .await
            .map_err(|source| ManagementError::Unreachable {
                base: self.base.clone(),
                source: source.without_url(),
            })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().await.unwrap_or_default();
        let body: String = body.trim().chars().take(300).collect();
        Err(ManagementError::Status {
            base: self.base.clone(),
            method: method.to_string(),
            path: path.to_owned(),
            status: status.as_u16(),
            body: crate::secret::Redactor::default()
                .add(self.password.clone())
                .redact(&body)
                .into_owned(),
        })
    }

    /// Whether vhost `name` exists.
    ///
    /// # Errors
    /// The API's, except 404.
    pub async fn vhost_exists(&self, name: &str) -> Result<bool, ManagementError> {
        let path = format!("/api/vhosts/{}", crate::amqp::percent_encode(name));
        match self.call(reqwest::Method::GET, &path, None).await {
            Ok(_) => Ok(true),
            Err(ManagementError::Status { status: 404, .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Creates vhost `name` (nothing happens when it exists) with `description`.
    ///
    /// # Errors
    /// The API's.
    pub async fn add_vhost(&self, name: &str, description: &str) -> Result<(), ManagementError> {
        let path = format!("/api/vhosts/{}", crate::amqp::percent_encode(name));
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(serde_json::json!({ "description": description })),
        )
        .await
        .map(drop)
    }

    /// Deletes vhost `name` with everything in it.
    ///
    /// # Errors
    /// The API's (404 when there is no such vhost).
    pub async fn delete_vhost(&self, name: &str) -> Result<(), ManagementError> {
        let path = format!("/api/vhosts/{}", crate::amqp::percent_encode(name));
        self.call(reqwest::Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    /// Creates or updates broker user `name` with `password` and `tags` (comma-separated:
    /// `administrator`, `monitoring`, ...; empty for none: such a user cannot use this API).
    ///
    /// # Errors
    /// The API's.
    pub async fn put_user(
        &self,
        name: &str,
        password: &str,
        tags: &str,
    ) -> Result<(), ManagementError> {
        let path = format!("/api/users/{}", crate::amqp::percent_encode(name));
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(serde_json::json!({ "password": password, "tags": tags })),
        )
        .await
        .map(drop)
    }

    /// Deletes broker user `name`.
    ///
    /// # Errors
    /// The API's (404 when there is no such user).
    pub async fn delete_user(&self, name: &str) -> Result<(), ManagementError> {
        let path = format!("/api/users/{}", crate::amqp::percent_encode(name));
        self.call(reqwest::Method::DELETE, &path, None)
            .await
            .map(drop)
    }

    /// Gives `user` the [`crate::topology::Permissions`] of its role on `vhost`.
    ///
    /// # Errors
    /// The API's.
    pub async fn grant(
        &self,
        vhost: &str,
        user: &str,
        p: &crate::topology::Permissions,
    ) -> Result<(), ManagementError> {
        self.set_permissions(vhost, user, &p.configure, &p.write, &p.read)
            .await
    }

    /// Sets `user`'s permissions on `vhost` (regular expressions over resource names).
    ///
    /// # Errors
    /// The API's.
    pub async fn set_permissions(
        &self,
        vhost: &str,
        user: &str,
        configure: &str,
        write: &str,
        read: &str,
    ) -> Result<(), ManagementError> {
        let path = format!(
            "/api/permissions/{}/{}",
            crate::amqp::percent_encode(vhost),
            crate::amqp::percent_encode(user)
        );
        self.call(
            reqwest::Method::PUT,
            &path,
            Some(serde_json::json!({ "configure": configure, "write": write, "read": read })),
        )
        .await
        .map(drop)
    }
}
